"""The reStructuredText documents render as written (issue 14.8).

A stray backtick inside an inline literal is valid markup that swallows the rest
of the paragraph into the literal, so docutils reports nothing: such literals are
looked for explicitly, besides every warning docutils does report.  A link to a
section or target that does not exist (a section moved to another page) is reported
only among the doctree's transform messages, so those count too.  Links to other
files must name files that exist, and docs/index.rst must list every page of docs/.
"""

import re
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


def test_the_docs_index_lists_every_page():
    index = (REPO / "docs" / "index.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"<([\w-]+\.rst)>`__", index))
    pages = {p.name for p in (REPO / "docs").glob("*.rst")} - {"index.rst"}
    assert pages <= listed, sorted(pages - listed)


@pytest.mark.parametrize("path", DOCUMENTS, ids=str)
def test_links_to_files_name_files_that_exist(path):
    text = (REPO / path).read_text(encoding="utf-8")
    targets = re.findall(r"<([^<>\s:]+\.(?:rst|png|md))>`__", text)
    targets += re.findall(r"^\.\. image:: (\S+)$", text, re.MULTILINE)
    missing = [t for t in targets if not (REPO / path).parent.joinpath(t).exists()]
    assert missing == []
