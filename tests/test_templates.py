"""The shipped templates and the override folder: a file there replaces the shipped one."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.errors import ConfigError
from mailgate.outbound.templates import SAMPLES, Templates, shipped_folder
from tests.conftest import REPO, run_cli, write_config


def overrides(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "overrides"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_the_shipped_set_is_the_checkouts_templates_folder() -> None:
    """The package's templates are the top-level templates/ (one copy in git)."""
    shipped = sorted(p.relative_to(shipped_folder()) for p in shipped_folder().rglob("*.*"))
    source = sorted(p.relative_to(REPO / "templates") for p in (REPO / "templates").rglob("*.*"))
    assert shipped == source and len(shipped) == 26
    Templates().check()


def test_an_override_replaces_its_file_and_the_rest_stays_shipped(tmp_path: Path) -> None:
    folder = overrides(
        tmp_path,
        {
            "mail/ticket_created.txt": "Ours: ticket {{ ticket_id }}\n",
            "page/verified.html": "<p>Thanks, {{ email }}</p>\n",
        },
    )
    templates = Templates(folder)
    shipped = Templates()
    assert templates.mail("ticket_created", "txt", SAMPLES["ticket_created"]) == "Ours: ticket 42"
    assert templates.page("verified.html", {"email": "<b>x@y</b>"}) == (
        "<p>Thanks, &lt;b&gt;x@y&lt;/b&gt;</p>"  # an override's HTML is autoescaped too
    )
    for name in ("subject.txt", "html"):
        assert templates.mail("ticket_created", name, SAMPLES["ticket_created"]) == shipped.mail(
            "ticket_created", name, SAMPLES["ticket_created"]
        )
    assert templates.page("confirm.html", SAMPLES["confirm.html"]) == shipped.page(
        "confirm.html", SAMPLES["confirm.html"]
    )
    assert templates.overridden() == (["mail/ticket_created.txt", "page/verified.html"], [])


def test_an_override_is_sandboxed_and_strict(tmp_path: Path) -> None:
    """An override is a template like the shipped ones: no attribute walks to Python
    internals, no silently empty variables; the error names the override file and line."""
    folder = overrides(tmp_path, {"mail/verification.txt": "Hi\n{{ email.__class__.__mro__ }}\n"})
    with pytest.raises(ConfigError, match=r"overrides/mail/verification\.txt:2: SecurityError"):
        Templates(folder).check()
    (folder / "mail" / "verification.txt").write_text("Hi\n\n{{ no_such }}\n")
    with pytest.raises(ConfigError, match=r"overrides/mail/verification\.txt:3: Undefined"):
        Templates(folder).check()


def test_an_override_folder_that_is_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"outbound\.templates: .*nowhere: not a folder"):
        Templates(tmp_path / "nowhere")


def test_check_config_lists_the_overrides_and_warns_of_a_file_that_replaces_none(
    tmp_path: Path,
) -> None:
    folder = overrides(
        tmp_path,
        {"mail/ticket_created.txt": "Ours {{ tag }}\n", "mail/ticket_craeted.txt": "typo\n"},
    )
    path = write_config(tmp_path, templates=folder)
    result = run_cli("--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    assert f"templates: overridden from {folder}: mail/ticket_created.txt\n" in result.stdout
    assert f"{folder / 'mail/ticket_craeted.txt'} replaces no shipped template" in result.stdout
