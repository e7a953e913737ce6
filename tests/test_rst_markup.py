"""The reStructuredText documents render as written (issue 14.8).

A stray backtick inside an inline literal is valid markup that swallows the rest
of the paragraph into the literal, so docutils reports nothing: such literals are
looked for explicitly, besides every warning docutils does report.  A link to a
section or target that does not exist (a section moved to another page) is reported
only among the doctree's transform messages, so those count too.
"""

from pathlib import Path

import docutils.core
import docutils.nodes
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    p.relative_to(REPO)
    for p in [REPO / "README.rst", *REPO.glob("contrib/**/*.rst"), *REPO.glob("docs/**/*.rst")])


@pytest.mark.parametrize("path", DOCUMENTS, ids=str)
def test_document_renders_without_warnings_or_runaway_literals(path):
    doctree = docutils.core.publish_doctree(
        (REPO / path).read_text(encoding="utf-8"), source_path=str(path),
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": False})
    messages = [m.astext() for m in [*doctree.findall(docutils.nodes.system_message),
                                     *doctree.transform_messages]
                if m["level"] >= 2]  # warnings and errors; INFO (a reused link) is fine
    assert messages == []
    runaway = [node.astext() for node in doctree.findall(docutils.nodes.literal)
               if "`" in node.astext()]
    assert runaway == []
