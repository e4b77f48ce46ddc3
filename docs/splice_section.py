"""Replaces the text between a section's generated-content markers in a markdown file.

Usage: python docs/splice_section.py SECTION GENERATED_FILE DOC   (markers: <!-- SECTION:begin ... --> and
<!-- SECTION:end -->; the begin marker's trailing note is kept as it is)."""
import pathlib
import sys

section, generated_path, doc_path = sys.argv[1:4]
generated = pathlib.Path(generated_path).read_text().rstrip() + "\n"
doc = pathlib.Path(doc_path)
text = doc.read_text()
begin_start = text.index(f"<!-- {section}:begin")
begin_end = text.index("-->", begin_start) + len("-->")
end = text.index(f"<!-- {section}:end -->", begin_end)
doc.write_text(text[:begin_end] + "\n" + generated + text[end:])
print(f"rewrote the {section} section of {doc}")
