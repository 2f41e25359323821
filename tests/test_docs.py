"""The README is a welcome page (short, the two commands first) and its links and quickstart work; docs/ holds the
detail, and every relative link in README.md and docs/*.md points to a file (and heading) that exists."""

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200
COMMANDS_WITHIN = 40
MAX_PARAGRAPH_LINES = 8
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(text):
    """(line number, line) of every line, with the lines of fenced code blocks (fences included) given as blank."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        fence = line.lstrip().startswith("```")
        if fence:
            in_fence = not in_fence
        yield number, "" if fence or in_fence else line


def paragraphs(text):
    """Runs of consecutive non-blank lines outside code blocks and tables (bullets included), as (first line number,
    lines)."""
    runs, current = [], []
    for number, line in prose_lines(text):
        if line.strip() and not line.lstrip().startswith("|"):
            current.append((number, line))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [(run[0][0], [line for _, line in run]) for run in runs]


def github_slug(heading):
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    return {github_slug(line.lstrip("#")) for _, line in prose_lines(path.read_text()) if re.match(r"#{1,6} ", line)}


def doc_files():
    return [README, *sorted(DOCS.glob("*.md"))]


# ----------------------------------------------------------------------------------------- (a) a short welcome page


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES}"


def test_readme_names_the_two_commands_first():
    lines = README.read_text().splitlines()[:COMMANDS_WITHIN]
    for command in ("make run", "make test"):
        assert any(line.startswith(command) for line in lines), (
            f"`{command}` is not at the start of a line within the first {COMMANDS_WITHIN} lines of README.md")


def test_readme_paragraphs_are_short():
    long = [(start, len(lines)) for start, lines in paragraphs(README.read_text()) if len(lines) > MAX_PARAGRAPH_LINES]
    assert not long, f"README.md paragraphs (first line, length) over {MAX_PARAGRAPH_LINES} lines: {long}"


def test_readme_headline_markers_enclose_the_tables():
    text = README.read_text()
    assert text.count("<!-- headline:start -->") == 1 and text.count("<!-- headline:end -->") == 1
    headline = text.split("<!-- headline:start -->")[1].split("<!-- headline:end -->")[0]
    assert "digits-pretrained" in headline and "| configuration |" in headline, "the headline tables moved out"
    assert headline.index("digits-pretrained") < headline.index("| configuration |"), "digits-pretrained leads"


# ------------------------------------------------------------------------------------------------- (b) the links


def links(path):
    return [(path, target) for _, line in prose_lines(path.read_text()) for target in LINK.findall(line)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    broken = []
    for _, target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"broken links in {path.relative_to(ROOT)}: {broken}"


def test_every_doc_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(README)}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert DOCS.is_dir() and not unlinked, f"docs not linked from README.md: {unlinked}"


# --------------------------------------------------------------------------------------------- (c) the quickstart


def quickstart_code():
    section = README.read_text().split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_offline_and_prints_what_it_claims(tmp_path, monkeypatch, capsys):
    code = quickstart_code()
    claimed_shape = ast.literal_eval(re.search(r"print\(out\.logits\.shape\)\s*#\s*(\(.*?\))", code).group(1))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "quickstart"})

    shape_line, weights_line, missing_line = capsys.readouterr().out.strip().splitlines()[-3:]
    assert shape_line == str(torch.Size(claimed_shape))
    weights = ast.literal_eval(weights_line)
    names = list(weights)
    assert names[0] == "redundancy" and names[-1] == "synergy"
    assert all(name.startswith("unique_") for name in names[1:-1]) and len(names) == 4
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-4)
    missing = [float(x) for x in re.search(r"\[(.*?)\]", missing_line).group(1).split(",")]  # tensor([0.5, 0., ...])
    assert len(missing) == len(names) and sum(missing) == pytest.approx(1.0, abs=1e-3)
    masked = [value for name, value in zip(names, missing) if name in ("unique_vision", "synergy")]
    assert masked == [0.0, 0.0], f"with vision missing, unique_vision and synergy should get no weight: {missing_line}"
    saved = {p.name for p in (tmp_path / "my-dmil").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_dmil.py", "configuration_dmil.py"} <= saved
