"""What a browser does with a confirmation link: open the page, read its form, press the button.

The form is read from the HTML (its action resolved against the page's URL, its hidden fields
sent back), and the POST carries what a browser would send from our own page: `Origin: null`
(our pages set `Referrer-Policy: no-referrer`) and `Sec-Fetch-Site: same-origin`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin

import aiohttp

SAME_ORIGIN = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.buttons = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append(Form(named.get("action", ""), named.get("method", "get").lower()))
        elif tag == "input" and self.forms and named.get("type") == "hidden":
            self.forms[-1].fields[named["name"]] = named.get("value", "")
        elif tag == "button" and self.forms:
            self.buttons += 1


def the_form(page: str) -> Form:
    """The page's one form, which has one button."""
    parser = _Forms()
    parser.feed(page)
    parser.close()
    assert len(parser.forms) == 1, page
    assert parser.buttons == 1, page
    return parser.forms[0]


@dataclass
class Answer:
    status: int
    page: str
    headers: dict[str, str]


async def fetch(
    url: str,
    *,
    method: str = "GET",
    data: dict[str, str] | bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=headers) as response,
    ):
        return Answer(response.status, await response.text(), dict(response.headers))


async def press_button(page_url: str, page: str) -> Answer:
    """Submit the page's form as a browser would."""
    form = the_form(page)
    assert form.method == "post"
    return await fetch(
        urljoin(page_url, form.action), method="POST", data=form.fields, headers=SAME_ORIGIN
    )


async def confirm(url: str) -> Answer:
    """Open the link and press its button; the GET's answer if it shows no form."""
    shown = await fetch(url)
    if shown.status != 200:
        return shown
    return await press_button(url, shown.page)
