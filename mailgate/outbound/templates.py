"""The jinja2 sandbox over the templates: data in, text out, never code (ARCHITECTURE rule 7).

The shipped set travels inside the package (`mailgate/templates`, the checkout's top-level
`templates/`), so an installed wheel runs from any folder. `[outbound] templates` names an
optional override folder: a file there (`mail/x.txt`, `page/y.html`) replaces the shipped one
of that name, and everything else still comes from the shipped set.

Sandboxed, `StrictUndefined` (a misspelt variable is an error, not an empty string), and
autoescaped for `.html` templates. Customer text only ever arrives as a variable.
`check()` renders every template with sample data, so `mailgate check-config` and start-up
report a broken template by file and line before any mail needs it.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from mailgate.errors import ConfigError

MAIL_KINDS = (
    "verification",
    "ticket_created",
    "agent_reply",
    "privacy_confirm",
    "privacy_export",
    "privacy_done",
    "privacy_erased",
)
MAIL_PARTS = ("subject.txt", "txt", "html")
PAGES = (
    "confirm.html",
    "verified.html",
    "token_invalid.html",
    "not_confirmed.html",
    "privacy_done.html",
)

_COMMON = {"ticket_id": 42, "tag": "[#42]"}
SAMPLES: Mapping[str, Mapping[str, Any]] = {
    "verification": {
        **_COMMON,
        "email": "customer@example.org",
        "verify_url": "https://support.example.com/verify/SAMPLE",
        "ttl_days": 7,
    },
    "ticket_created": _COMMON,
    "agent_reply": {
        **_COMMON,
        "subject": "Printer on fire",
        "body": "Hello,\nplease unplug it.\n",
        "requester_name": "Customer",
        "agent_name": None,
        "agent_email": None,
    },
    "privacy_confirm": {
        **_COMMON,
        "action": "erase",
        "confirm_url": "https://support.example.com/privacy/confirm/SAMPLE",
        "ttl_days": 7,
    },
    "privacy_export": {
        **_COMMON,
        "export_size": 12 * 1024 * 1024,
        "max_size": 10 * 1024 * 1024,
        "too_large": 1,
    },
    "privacy_done": {**_COMMON, "action": "restrict"},
    "privacy_erased": {"tag": ""},  # a system mail: no ticket
    "confirm.html": {"purpose": "verification", "action": "./SAMPLE", "csrf": "0" * 64},
    "verified.html": {"email": "customer@example.org"},
    "token_invalid.html": {"purpose": "verification", "reason": "used"},
    "not_confirmed.html": {"purpose": "verification", "reason": "forbidden"},
    "privacy_done.html": {"request": "erase", "outcome": "erased"},
}


def _every_template() -> Iterator[tuple[str, str]]:
    """Every template mailgate renders ("mail/verification.txt", "page/x.html"), with the
    name of its sample data."""
    for kind in MAIL_KINDS:
        for part in MAIL_PARTS:
            yield f"mail/{kind}.{part}", kind
    for page in PAGES:
        yield f"page/{page}", page


def shipped_folder() -> Path:
    """The templates installed with the package (a folder: mailgate is never run zipped)."""
    return Path(str(resources.files("mailgate").joinpath("templates")))


class Templates:
    """Render mail parts and pages: the override folder's file where there is one, else the
    shipped one."""

    def __init__(self, overrides: Path | None = None) -> None:
        """Look in `overrides` (the optional `[outbound] templates`) first, then the shipped set.

        Raises:
            ConfigError: `overrides` is given but is not a folder.
        """
        if overrides is not None and not overrides.is_dir():
            raise ConfigError(f"outbound.templates: {overrides}: not a folder")
        self.overrides = overrides
        self.shipped = shipped_folder()
        self._folders = (*([overrides] if overrides else []), self.shipped)
        self._env = SandboxedEnvironment(
            loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(f) for f in self._folders]),
            # A template is read once (`check()` reads every one, at start and at SIGHUP) and
            # kept: jinja2's default reads a file again whenever it changed on disk, so an
            # override edited (half saved, or broken) would be used at once, unchecked.
            auto_reload=False,
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            keep_trailing_newline=False,
        )

    def render(self, name: str, variables: Mapping[str, Any]) -> str:
        """Render `name` (e.g. "mail/verification.txt").

        Raises:
            ConfigError: the template is missing or broken; the message names file and line.
        """
        try:
            return self._env.get_template(name).render(variables)
        except jinja2.TemplateError as exc:
            raise ConfigError(self._locate(name, exc)) from exc

    def mail(self, kind: str, part: str, variables: Mapping[str, Any]) -> str:
        return self.render(f"mail/{kind}.{part}", variables)

    def page(self, name: str, variables: Mapping[str, Any]) -> str:
        return self.render(f"page/{name}", variables)

    def check(self) -> None:
        """Render every template with sample data; raise ConfigError at the first failure."""
        for name, sample in _every_template():
            self.render(name, SAMPLES[sample])

    def overridden(self) -> tuple[list[str], list[str]]:
        """The override folder's files: those that replace a shipped template, and those that
        replace none (a misspelt name would otherwise be ignored without a word)."""
        if self.overrides is None:
            return [], []
        found = sorted(
            p.relative_to(self.overrides).as_posix()
            for p in self.overrides.rglob("*")
            if p.is_file()
        )
        known = {name for name, _ in _every_template()}
        return [n for n in found if n in known], [n for n in found if n not in known]

    def _source(self, name: str) -> Path:
        """The file `name` is rendered from: the override's, else the shipped one."""
        for folder in self._folders:
            if (folder / name).is_file():
                return folder / name
        return self._folders[0] / name

    def adopt(self, other: Templates) -> None:
        """Render from now on what `other` renders (a reload, once `other.check()` passed):
        every holder of this object (the composer, the web pages) sees the new set."""
        vars(self).update(vars(other))  # its folders and its jinja2 environment, whole

    def _locate(self, name: str, exc: jinja2.TemplateError) -> str:
        """'templates/mail/x.html:3: message', from the error or its traceback."""
        if isinstance(exc, jinja2.TemplateNotFound):
            searched = " nor ".join(str(f) for f in self._folders)
            return f"{name}: template not found in {searched}"
        where, line = self._source(name), getattr(exc, "lineno", None)
        if isinstance(exc, jinja2.TemplateSyntaxError) and exc.name:
            where = self._source(exc.name)
        else:
            # jinja2 rewrites the traceback so that template lines appear as frames
            for frame in traceback.extract_tb(exc.__traceback__):
                if frame.filename.startswith(tuple(str(f) for f in self._folders)):
                    where, line = Path(frame.filename), frame.lineno
        suffix = f":{line}" if line else ""
        return f"{where}{suffix}: {type(exc).__name__}: {exc.message or exc}"
