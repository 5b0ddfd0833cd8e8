"""The bad-input tables the tests write into docs/bad-inputs.md (test_reliability.py, test_pipeline_args.py)."""


def code_cell(text: str) -> str:
    """``text`` as inline code in a markdown table cell: pipes escaped, double backticks where it holds one."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def table_section(text: str, start: str, end: str) -> str:
    """The table between the ``start`` and ``end`` marker lines of a doc's ``text``."""
    assert start in text and end in text, f"the doc lacks the {start} / {end} markers"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def write_table(doc, start: str, end: str, table: str) -> None:
    """Replace the table between the markers in the file ``doc`` (a Path) with ``table``."""
    text = doc.read_text(encoding="utf-8")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(f"{head}{start}\n{table}\n{end}{tail}", encoding="utf-8")
