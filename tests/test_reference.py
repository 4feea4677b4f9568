"""The published numbers (reports/reference): every CSV parses, names its source on every row and is listed in the
README; the report's mitigation section lists the published mitigation rows beside ours, labelled as such."""
import re

import pytest

from benchmark.jobs.results import MitigationResult
from reports.jobs import Job
from reports.leaderboard import Inputs, mitigation_section
from reports.tables import PUBLISHED_MITIGATION, REFERENCE, published, published_mitigation

CSVS = sorted(p.name for p in REFERENCE.glob("*.csv"))
# rows quoted before the table was recorded, and whose paper's tables are not readable here: the README's "Not
# available here" says so; no other CSV may leave its table or figure out
TABLE_NOT_NAMED = {"localization_iou_thirdparty.csv"}


@pytest.mark.parametrize("name", CSVS)
def test_every_row_names_its_source(name):
    table = published(name)
    assert len(table) > 0 and table.columns[0] == "source", name
    sources = table.source.astype("string").str.strip()
    assert sources.notna().all() and (sources != "").all(), f"{name}: a row without its source"
    # every source names the paper's year and a table or figure (a number without one is not quoted)
    assert sources.str.contains(r"20\d\d").all(), name
    assert sources.str.contains(r"Table \d|Fig\. \d").all() != (name in TABLE_NOT_NAMED), name


def test_the_readme_lists_every_csv_and_no_missing_one():
    readme = (REFERENCE / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+\.csv)` \|", readme, re.MULTILINE))
    assert listed == set(CSVS)
    assert set(PUBLISHED_MITIGATION) <= set(CSVS)


def test_the_mitigation_section_lists_the_published_rows_beside_ours(tmp_path):
    curves = [{"kind": kind, "method": method, "strength": strength, "train_rmse": 0.1 * i}
              for i, (kind, method, strength) in enumerate([("local", "none", None), ("local", "wen", 1.0)])]
    job = Job(tmp_path, MitigationResult(model="testbed", prompt_set="testbed_mem", curves=curves), {}, label="mine")
    section = mitigation_section(Inputs([job], [], tmp_path, "auc"))
    quoted = published_mitigation()
    assert section.shown and len(quoted) == sum(len(published(n)) for n in PUBLISHED_MITIGATION)
    details = section.html[section.html.index("<details>"):]
    assert "published, SD v1-4, not comparable to testbed numbers" in details
    assert details.count("<tr>") == 1 + len(quoted)  # the header and every published row
    for source in quoted.source.unique():
        assert source in details
    # ours stay ours: the section's files hold our points only
    assert "Chen et al." not in section.files["csv"] and len(section.files["csv"].splitlines()) == 1 + len(curves)
