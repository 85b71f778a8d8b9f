"""Personal data rules: tokens now; retention, rights, encryption and audit to come."""
