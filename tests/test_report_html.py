"""report.html: the page's content and data (pure, fast), and the document browser in a real headless Chromium.

The browser tests drive Debian's chromium through its chromedriver with selenium; nothing is downloaded. They skip,
saying why, where either is missing (.ci/run installs both). Screenshots land in pytest's tmp folder (printed with -s).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_report import make_results, with_documents

from peftsum.cli import main
from peftsum.config import DataConfig
from peftsum.core.data import load_eval
from peftsum.evaluation.metrics import ROUGE_KEYS, rouge_per_document
from peftsum.outputs.report import render_markdown, write_report
from peftsum.outputs.report_html import browser_data, markdown_to_html, script_json
from peftsum.study.analysis import upgrade

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Flags that let chromium run headless as root in a container, and keep it from calling home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1100"]

# Five documents with designed ROUGE-1 (every key the same) so that each sort and filter has one right answer.
DOCS = {
    "d0": ("The city council met on Monday in Leeds and approved new bus routes for the centre.",
           "Leeds council approves new bus routes."),
    "d1": ("Heavy rain flooded the valley roads overnight, and drivers were told to stay home.",
           "Floods close valley roads."),
    "d2": ("A page that quotes </script><script>window.pwned = 1</script><!-- and & < > in its text.",
           "Markup in a document stays text."),
    "d3": ("The school opened a new library with four thousand books donated by parents.",
           "School opens library with donated books."),
    "d4": ("Fares on the night trains will rise by ten percent from April, the operator said.",
           "Night train fares to rise."),
}
SCORES = {"lora": [50, 10, 30, 70, 20], "prompt": [40, 30, 30, 20, 60], "finetune": [5, 5, 5, 5, 5]}
BASELINE = [10, 20, 10, 10, 10]
PREDICTIONS = {
    "baseline": {d: "The article is about a city." for d in DOCS},
    "lora": {**{d: f"{DOCS[d][1]} (lora)" for d in DOCS}, "d0": "The council approved new bus routes in Leeds."},
    "prompt": {**{d: f"Something else about {d}." for d in DOCS}, "d0": "Mayor Smith cancelled 40 trains."},
    "finetune": {d: "the the the" for d in DOCS},
}


def page_data(page: str) -> dict:
    """The document browser's JSON, read back out of a report.html."""
    block = re.search(r'<script type="application/json" id="doc-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    """A run folder as compare leaves it: results.json (designed per-document scores), prediction files, data."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": d, "document": text, "summary": ref} for d, (text, ref) in DOCS.items()]
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    order, _ = load_eval(DataConfig(source=str(data), eval_size=len(DOCS)), seed=7)  # the run's seeded order
    ids = [e.id for e in order]
    index = [list(DOCS).index(i) for i in ids]
    results = with_documents(make_results(), {m: np.array(s, float)[index] for m, s in SCORES.items()},
                             np.array(BASELINE, float)[index])
    results["config"]["data"] = {"source": str(data), "eval_size": len(DOCS)}
    run = tmp_path / "run"
    for name, by_id in PREDICTIONS.items():
        if name != "baseline":
            results["methods"][name]["dir"] = name
        (run / name).mkdir(parents=True)
        (run / name / "predictions_eval.jsonl").write_text("".join(
            json.dumps({"id": i, "prediction": by_id[i], "reference": DOCS[i][1]}) + "\n" for i in ids))
    (run / "results.json").write_text(json.dumps(results))
    write_report(upgrade(results), run)
    return run


# ---------------------------------------------------------------- content and data (no browser)


def test_markdown_sections_and_tables_become_html():
    md = render_markdown(upgrade(make_results()))
    sections = dict(markdown_to_html(md))
    assert list(sections)[1:] == ["Verdict", "Results", "Significance", "Resources", "Plots", "Configuration"]
    md_rows = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|---")]
    html_rows = "".join(sections.values()).count("<tr>")
    assert html_rows == len(md_rows)  # every table row of report.md, header rows included
    assert "<strong>lora</strong>" in sections["Verdict"] and "<pre><code>model:" in sections["Configuration"]


def test_page_is_self_contained_and_its_data_survives_markup_in_documents(synthetic_run):
    page = (synthetic_run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing to fetch
    assert page.count("data:image/png;base64,") == 2  # both charts inline
    assert "default-src 'none'" in page
    data = page_data(page)
    assert [d["document"] for d in data["documents"] if d["id"] == "d2"] == [DOCS["d2"][0]]
    assert page.count("</script>") == 2  # the JSON block's and the script's: the document's is escaped
    assert json.loads(script_json({"x": "</script><!--&"})) == {"x": "</script><!--&"}


def test_browser_data_columns_scores_and_documents(synthetic_run):
    results = json.loads((synthetic_run / "results.json").read_text())
    data = browser_data(results, synthetic_run)
    assert [c["label"] for c in data["columns"]] == ["untouched model", "lora", "prompt", "finetune"]
    by_id = {d["id"]: d for d in data["documents"]}
    for name, scores in SCORES.items():
        assert [by_id[d]["scores"][name]["rouge1"] for d in DOCS] == scores
        assert {d: by_id[d]["predictions"][name] for d in DOCS} == PREDICTIONS[name]
    assert all(by_id[d]["document"] == DOCS[d][0] for d in DOCS) and data["notes"] == []


def test_old_results_get_per_document_rouge_computed_and_missing_data_a_note(synthetic_run):
    results = json.loads((synthetic_run / "results.json").read_text())
    for split in [results["baseline"]["eval"], *(m["after"]["eval"] for m in results["methods"].values())]:
        del split["per_document"]  # results.json of an older peftsum
    (synthetic_run / "results.json").write_text(json.dumps(results))
    shutil.rmtree(synthetic_run.parent / "data")
    assert main(["report", str(synthetic_run)]) == 0
    data = page_data((synthetic_run / "report.html").read_text())
    rows = [json.loads(line) for line in (synthetic_run / "lora" / "predictions_eval.jsonl").read_text().splitlines()]
    expected = rouge_per_document([r["prediction"] for r in rows], [r["reference"] for r in rows])
    for key in ROUGE_KEYS:
        assert [d["scores"]["lora"][key] for d in data["documents"]] == [round(v, 3) for v in expected[key]]
    assert all(d["document"] is None for d in data["documents"])
    assert any("no longer there" in n for n in data["notes"])
    assert any("computed from its predictions file" in n for n in data["notes"])


def test_several_seeds_give_a_column_per_seed(tiny_comparison, tmp_path):
    results = json.loads((tiny_comparison / "results.json").read_text())
    lora = results["methods"]["lora"]
    lora["seed_runs"] = [{**lora, "seed": s, "dir": f"lora/seed-{s}"} for s in (0, 1)]
    for s in (0, 1):  # the layout of --seeds 2: lora/seed-S/
        (tmp_path / f"lora/seed-{s}").mkdir(parents=True)
        shutil.copy(tiny_comparison / "lora" / "predictions_eval.jsonl", tmp_path / f"lora/seed-{s}")
    data = browser_data(results, tmp_path)
    assert [c["key"] for c in data["columns"]] == ["lora/seed-0", "lora/seed-1"]
    assert [c["label"] for c in data["columns"]] == ["lora · seed 0", "lora · seed 1"]
    assert any("untouched model: no predictions file" in n for n in data["notes"])


def test_report_command_refuses_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


# ---------------------------------------------------------------- in a real browser


def _browser_missing() -> str | None:
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        return "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (pip install -r requirements.txt)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="peftsum-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # a given driver: no Selenium Manager
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_report(driver, path: Path):
    driver.get(path.resolve().as_uri())
    driver.get_log("browser")  # start each test with an empty console log
    driver.refresh()


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def visible_ids(driver) -> list[str]:
    return [tr.get_attribute("data-id") for tr in driver.find_elements("css selector", "#doc-table tbody tr")]


def header(driver, key: str):
    return driver.find_element("css selector", f'#doc-table th[data-sort="{key}"]')


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", select_id)).select_by_value(value)


def card_spans(driver, column: str, cls: str) -> list[str]:
    return [s.text for s in driver.find_elements("css selector", f'.prediction[data-column="{column}"] .{cls}')]


def screenshot(driver, path: Path) -> None:
    driver.execute_script("document.getElementById('documents').scrollIntoView()")
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 20_000
    print(f"\nscreenshot: {path}")


def test_browser_sorts_filters_searches_and_highlights(browser, synthetic_run, tmp_path):
    open_report(browser, synthetic_run / "report.html")
    labels = [th.text for th in browser.find_elements("css selector", "#doc-table thead th")]
    assert labels[4:8] == ["untouched model", "lora", "prompt", "finetune"]
    cards = browser.find_elements("css selector", "#doc-detail .prediction")
    assert [c.get_attribute("data-column") for c in cards] == ["baseline", "lora", "prompt", "finetune"]
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert browser.execute_script("return window.pwned === undefined")

    header(browser, "col:lora").click()  # best first
    assert visible_ids(browser) == ["d3", "d0", "d2", "d4", "d1"]
    header(browser, "col:lora").click()
    assert visible_ids(browser) == ["d1", "d4", "d2", "d0", "d3"]

    choose(browser, "doc-b", "prompt")  # A is lora
    choose(browser, "doc-filter", "a")
    assert visible_ids(browser) == ["d3", "d0"]  # lora − prompt: +50, +10
    browser.find_element("id", "doc-swap").click()
    assert visible_ids(browser) == ["d4", "d1"]  # prompt − lora: +40, +20
    choose(browser, "doc-filter", "b")
    assert visible_ids(browser) == ["d3", "d0"]  # B (now lora) beats A (prompt)
    assert browser.find_element("id", "doc-count").text == "2 of 5 documents"
    choose(browser, "doc-filter", "all")

    search = browser.find_element("id", "doc-search")
    search.send_keys("leeds")
    assert visible_ids(browser) == ["d0"]
    detail = browser.find_element("id", "doc-detail")
    assert DOCS["d0"][0] in detail.text and DOCS["d0"][1] in detail.text
    choose(browser, "doc-highlight", "document")
    assert {"approved", "new", "bus", "routes"} <= set(card_spans(browser, "lora", "hl-copy"))
    assert card_spans(browser, "prompt", "hl-name") == ["Smith", "40"]  # "Mayor" starts the sentence
    choose(browser, "doc-highlight", "reference")
    assert "Leeds." in card_spans(browser, "lora", "hl-shared")  # in the reference, not in a 3-word run of it
    search.clear()
    search.send_keys("pwned")
    assert visible_ids(browser) == ["d2"]
    assert DOCS["d2"][0] in browser.find_element("css selector", "#doc-detail .document").text  # shown as text
    screenshot(browser, tmp_path / "report-synthetic.png")
    assert severe(browser) == []


def test_browser_on_a_real_tiny_comparison(browser, tiny_comparison, tmp_path):
    results = json.loads((tiny_comparison / "results.json").read_text())
    open_report(browser, tiny_comparison / "report.html")
    labels = [th.text for th in browser.find_elements("css selector", "#doc-table thead th")]
    assert {"untouched model", "lora", "prompt", "finetune"} <= set(labels)
    cards = browser.find_elements("css selector", "#doc-detail .prediction")
    assert [c.get_attribute("data-column") for c in cards] == ["baseline", "lora", "prompt", "finetune"]
    ids = [json.loads(line)["id"] for line in (tiny_comparison / "lora" / "predictions_eval.jsonl").open()]
    assert visible_ids(browser) == ids

    header(browser, "index").click()  # already ascending: now descending
    assert visible_ids(browser) == ids[::-1]
    lora = results["methods"]["lora"]["after"]["eval"]["per_document"]["rouge1"]
    base = results["baseline"]["eval"]["per_document"]["rouge1"]
    header(browser, "col:lora").click()
    assert visible_ids(browser) == [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-lora[i], i))]
    choose(browser, "doc-filter", "a")  # A = lora, B = the untouched model
    gaps = [a - b for a, b in zip(lora, base)]
    assert visible_ids(browser) == [ids[i] for i in sorted((i for i in range(len(ids)) if gaps[i] > 0),
                                                           key=lambda i: (-gaps[i], i))]
    choose(browser, "doc-filter", "all")
    browser.find_element("id", "doc-search").send_keys(ids[2])
    assert visible_ids(browser) == [ids[2]]
    document = browser.find_element("css selector", "#doc-detail .document .body").text
    data_rows = [json.loads(line) for line in (tiny_comparison.parent / "data" / "validation.jsonl").open()]
    assert document == next(r["document"] for r in data_rows if r["id"] == ids[2])
    screenshot(browser, tmp_path / "report-tiny.png")
    assert severe(browser) == []
