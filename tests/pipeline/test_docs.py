"""README.md's stage reference is generated from the code and must be up to date."""

from pipeline.docs import BEGIN, END, README, stage_reference


def test_readme_stage_reference_is_current():
    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert block.strip() == stage_reference().strip(), "run: python -m pipeline.docs --write"


def test_readme_opens_with_make_demo_and_make_test():
    head = README.read_text().split("\n\n")[1]
    assert "make demo" in head and "make test" in head
