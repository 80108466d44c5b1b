"""README.md and docs/: every relative link resolves (files and #anchors), and every command line
shown in a code block parses with the command's own argument parser (parsed, never run)."""

import re
import shlex

import pytest

import download
import super_resolve
import train
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train.py": lambda: train.build_parser()[0], "super_resolve.py": super_resolve.build_parser,
           "data.py": download.build_parser}


def anchors(page) -> set[str]:
    """The #anchors of a page's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(page) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code is not a link
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


def commands(page) -> list[list[str]]:
    """Each command line of the page's code blocks that runs one of PARSERS' scripts, as its arguments
    from the script's name on (backslash continuations joined, trailing comments dropped)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("python", "torchrun") and any(w in PARSERS for w in words):
                found.append(words[next(i for i, w in enumerate(words) if w in PARSERS):])
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target} names no heading of {linked.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_parses(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # as the pages' commands are run: in the repository, where @recipes/... lie
    for script, *args in commands(page):
        try:
            PARSERS[script]().parse_args(args)
        except SystemExit:
            pytest.fail(f"{page.name}: python {script} {shlex.join(args)} does not parse", pytrace=False)


def test_the_pages_show_commands_and_links_to_check():
    assert sum(len(commands(page)) for page in PAGES) >= 15 and len(links(PAGES[0])) >= 8
    assert len(PAGES) >= 8
    shown = {arg for page in PAGES for command in commands(page) for arg in command if arg.startswith("@")}
    assert shown >= {f"@recipes/{recipe.name}" for recipe in (ROOT / "recipes").iterdir()}  # each recipe, as run


def flag_tables(page) -> dict[str, set[str]]:
    """Each flag table of a page (a table whose header's first cell is "flag" or "option"), by the
    heading of the section it lies in: the flags its rows' first cells name."""
    tables, heading, table = {}, None, None
    for line in page.read_text().splitlines():
        if line.startswith("## "):
            heading = line
        if re.match(r"\| (flag|option) \|", line):
            table = tables.setdefault(heading, set())
        elif line.startswith("|") and table is not None:
            table |= set(re.findall(r"`(--[\w-]+)", line.split("|")[1]))
        else:
            table = None
    return tables


def test_commands_md_flag_tables_name_every_flag_of_help():
    """Issue 60: the train table had lost two rows into a paragraph and never listed --pass-patches."""
    parsers = {"train.py train": train.build_parser()[1], "super_resolve.py": super_resolve.build_parser()}
    tables = flag_tables(ROOT / "docs" / "commands.md")
    for name, parser in parsers.items():
        section = next(heading for heading in tables if name in heading)
        flags = {option for action in parser._actions for option in action.option_strings
                 if option.startswith("--") and option not in ("--help", "--version")}
        assert tables[section] == flags, (name, sorted(flags - tables[section]), sorted(tables[section] - flags))


def test_the_readme_stays_short_and_the_runtime_needs_no_test_tools():
    """The README under 10,000 characters (the rest in docs/); requirements.txt is what upscaling and
    training need, requirements-dev.txt (the README's one install) adds the test and CI tools to it."""
    assert len((ROOT / "README.md").read_text()) < 10_000
    runtime = (ROOT / "requirements.txt").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev and "pip install -r requirements-dev.txt" in (ROOT / "README.md").read_text()
    for tool in ("pytest", "ruff", "playwright", "hypothesis"):
        assert tool not in runtime and tool in dev
