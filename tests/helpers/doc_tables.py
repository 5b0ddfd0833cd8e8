"""The bad-input tables the tests write into docs/bad-inputs.md (test_reliability.py, test_pipeline_args.py)."""


def code_cell(text: str) -> str:
    """``text`` as inline code in a markdown table cell: pipes escaped, double backticks where it holds one."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"
