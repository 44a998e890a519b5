"""Snakemake's self-contained HTML report (`snakemake --report`) after a run on the tiny config: what
it embeds, by category, and what a real browser shows of it. Headless Chromium opens the report,
a user's clicks (Evaluation, Results, the results table's view button) open the results table in
the report's own viewer, the rendered tables must hold the run's rsum values read from report.csv
and differences.csv, and a screenshot is taken. Without Chromium that test is skipped with the
reason (.ci/run installs it where it can)."""

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import time

import pandas as pd
import pytest

from models.variants import VARIANT_LABELS
from tests.helpers import succeeded, tiny_config

pytestmark = pytest.mark.workflow

WIDTH, HEIGHT = 1400, 900
# A guard against a hung browser, not a speed requirement: the report loads in seconds.
PATIENCE_S = 180


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("html_report")
    config = tiny_config()
    succeeded(workdir, config)
    page = workdir / "report.html"
    succeeded(workdir, config, "--report", str(page))
    return workdir, config, page


def script_value(page, script_id, variable):
    """The JSON value a report <script id=...> assigns to `variable`."""
    match = re.search(
        rf'<script id="{script_id}">\s*var {variable} = (.*?);\s*</script>', page.read_text(), re.S
    )
    assert match, f"no {script_id} script in the report"
    return json.loads(match.group(1))


def test_report_holds_the_marked_outputs_by_category_with_their_captions(html_report):
    workdir, config, page = html_report
    results, categories = (
        script_value(page, "results", "results"),
        script_value(page, "categories", "categories"),
    )
    r = "results/demo_precomp"
    assert categories["Data"] == {"Other": [f"{r}/prepared/manifest.json"]}
    assert categories["Training"]["Curves"] == [f"{r}/report/curves.png"]
    logs = {f"{r}/train/vsepp/{v}/seed0/val_log.csv" for v in ["baseline", *config["aoq"]["variants"]]}
    assert set(categories["Training"]["Validation logs"]) == logs
    assert {results[p]["labels"]["method"] for p in logs} == {"baseline", *config["aoq"]["variants"]}
    assert set(categories["Evaluation"]["Results"]) == {
        f"{r}/report/{name}" for name in ("results_table.html", "report.md", "report.csv")
    }
    assert set(categories["Evaluation"]["Statistics"]) == {
        f"{r}/report/statistics.png",
        f"{r}/report/differences.csv",
    }
    # Embedded as they are on disk, the table as HTML (which the report displays in place).
    table = results[f"{r}/report/results_table.html"]
    assert table["mime_type"] == "text/html"
    embedded = base64.b64decode(table["data_uri"].split("base64,", 1)[1])
    assert embedded == (workdir / r / "report" / "results_table.html").read_bytes()
    # Captions are rendered from workflow/report/*.rst with the run's config and wildcards.
    resamples = config["report"]["bootstrap"]["resamples"]
    assert f"{resamples} resamples" in results[f"{r}/report/statistics.png"]["caption"]
    assert "seed 0" in results[f"{r}/train/vsepp/offquin/seed0/val_log.csv"]["caption"]
    assert "demo_precomp" in script_value(page, "workflow-desc", "workflow_desc")


def chromium_binary():
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe:
    it reads commands on fd 3 and answers on fd 4, NUL-terminated JSON), which needs no package
    beyond the standard library."""

    def __init__(self, binary, profile, log):
        commands_r, self._commands = os.pipe()
        self._answers, answers_w = os.pipe()
        # The child's ends above fd 4 first, so that moving them onto 3 and 4 overwrites neither.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, answers_w)]
        os.close(commands_r)
        os.close(answers_w)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe"]
        self.process = subprocess.Popen(
            [binary, *args, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=lambda: (os.dup2(ends[0], 3), os.dup2(ends[1], 4)),
            close_fds=False,  # the pipes' other fds are close-on-exec; dup2 makes 3 and 4 inherited
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        for fd in ends:
            os.close(fd)
        self._buffer, self._id = b"", 0

    def _answer(self, deadline):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, session=None, **params):
        self._id += 1
        command = {"id": self._id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + PATIENCE_S
        while True:
            answer = self._answer(deadline)
            if answer.get("id") == self._id:  # anything else is an event, not needed here
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def close(self):
        try:
            self.send("Browser.close")
            self.process.wait(30)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._answers)


class Tab:
    def __init__(self, browser):
        self.browser = browser
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def send(self, method, **params):
        return self.browser.send(method, session=self.session, **params)

    def evaluate(self, expression, context=None):
        options = {"contextId": context} if context else {}
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True, **options)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def until(self, what, probe):
        """Poll `probe` (a function) until it returns a true value; that value."""
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the report never showed {what}")

    def click(self, text, where):
        """Click the first link of `where` (a CSS selector) whose text is `text`, as a user would."""
        return self.evaluate(
            f"(() => {{ const a = [...document.querySelectorAll({json.dumps(where)})]"
            f".find(a => a.textContent.trim() === {json.dumps(text)}); if (a) a.click(); return !!a; }})()"
        )

    def frame_context(self, url_prefix):
        """An execution context in the child frame whose URL starts with `url_prefix`, or None."""
        for child in self.send("Page.getFrameTree")["frameTree"].get("childFrames", []):
            if child["frame"]["url"].startswith(url_prefix):
                world = self.send("Page.createIsolatedWorld", frameId=child["frame"]["id"], worldName="test")
                return world["executionContextId"]
        return None


# Per evaluation section of the displayed page: its tables (caption, rows of rendered cell
# texts) and where the first row's last cell is painted, relative to the frame.
READ_TABLES = """JSON.stringify(document.readyState !== 'complete' ? null :
  [...document.querySelectorAll('section')].map(section => ({
    evaluation: section.id,
    tables: [...section.querySelectorAll('h3')].map(h => ({
      caption: h.textContent.trim(),
      rows: [...h.nextElementSibling.tBodies[0].rows].map(tr => [...tr.cells].map(td => td.innerText.trim())),
    })),
    cell: (r => ({x: r.x, y: r.y, width: r.width, height: r.height}))(
      section.querySelector('tbody tr td:last-child').getBoundingClientRect()),
  })))"""


def shown_tables(tab):
    def probe():
        try:
            context = tab.frame_context("data:text/html")
            tables = context and json.loads(tab.evaluate(READ_TABLES, context))
        except RuntimeError:  # the frame navigated away under us: look again
            return None
        return tables or None

    return tab.until("the results table in its viewer", probe)


def run_label(model, variant):
    return model, VARIANT_LABELS.get(variant, variant)


def expected_rsum_cells(report_csv):
    """Per evaluation, (model, method) -> the rsum cell of the per-seed table, formatted as the
    report formats it: the mean over seeds, ± their standard deviation when there are several."""
    table = pd.read_csv(report_csv)
    seeds = table[table["subset"].str.startswith("seed")]
    expected = {}
    for (evaluation, model, variant), group in seeds.groupby(["evaluation", "model", "variant"]):
        rsum = group["rsum"]
        cell = f"{rsum.mean():.1f} ± {rsum.std(ddof=1):.1f}" if len(rsum) > 1 else f"{rsum.mean():.1f}"
        expected.setdefault(evaluation, {})[run_label(model, variant)] = cell
    return expected


def expected_difference_cells(differences_csv):
    expected = {}
    for row in pd.read_csv(differences_csv).itertuples():
        expected.setdefault(row.evaluation, {})[run_label(row.model, row.variant)] = (
            f"{row.rsum_difference:+.1f}"
        )
    return expected


def test_browser_shows_the_results_table_with_the_runs_rsum(html_report):
    binary = chromium_binary()
    if binary is None:
        pytest.skip(
            "headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it "
            "where it runs as root with apt-get), so the HTML report was not opened in a browser"
        )
    from PIL import Image

    workdir, config, page = html_report
    report = workdir / "results" / "demo_precomp" / "report"
    with open(workdir / "chromium.log", "wb") as log:
        browser = Chromium(binary, workdir / "chromium-profile", log)
        try:
            tab = Tab(browser)
            tab.send("Page.navigate", url=page.as_uri())
            # The report is a single-page app: its menu exists once its scripts have run. In the
            # pinned Snakemake's report the navbar's menus and result lists sit in `div.p-3` (the
            # breadcrumbs, which repeat "Results", outside it).
            tab.until("its menu", lambda: tab.evaluate("!!document.querySelector('nav div.p-3 a')"))
            tab.until("the Evaluation category", lambda: tab.click("Evaluation", "nav div.p-3 a"))
            tab.until("the Results subcategory", lambda: tab.click("Results", "nav div.p-3 a"))
            view_button = (
                "(() => { const row = [...document.querySelectorAll('nav tbody tr')]"
                ".find(tr => tr.cells[0].textContent.trim() === 'results table');"
                " if (row) row.querySelector('a').click(); return !!row; })()"
            )
            tab.until("the results table's entry", lambda: tab.evaluate(view_button))
            sections = shown_tables(tab)
            frame = tab.evaluate(
                "(r => ({x: r.x, y: r.y}))(document.querySelector('iframe').getBoundingClientRect())"
            )
            shot = base64.b64decode(tab.send("Page.captureScreenshot", format="png")["data"])
        finally:
            browser.close()
    screenshot = workdir / "report-screenshot.png"
    screenshot.write_bytes(shot)
    print(f"screenshot of the results table in the HTML report: {screenshot}")

    # The rendered tables hold the run's numbers, for every configured evaluation.
    rsum_cells = expected_rsum_cells(report / "report.csv")
    difference_cells = expected_difference_cells(report / "differences.csv")
    assert sorted(s["evaluation"] for s in sections) == sorted(e["name"] for e in config["evaluation"])
    for section in sections:
        tables = {t["caption"]: t["rows"] for t in section["tables"]}
        shown_rsum = {(row[0], row[1]): row[-1] for row in tables["Over seeds"]}
        assert shown_rsum == rsum_cells[section["evaluation"]], section["evaluation"]
        shown_differences = {
            (row[0], row[1]): row[3] for row in tables["Paired difference from the baseline"]
        }
        assert shown_differences == difference_cells[section["evaluation"]], section["evaluation"]

    # The screenshot is the whole window, and where the first evaluation's first rsum cell is,
    # something is painted in a dark ink on the light cell: the table shows, not a blank frame.
    image = Image.open(io.BytesIO(shot))
    assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
    cell = sections[0]["cell"]
    left, top = frame["x"] + cell["x"], frame["y"] + cell["y"]
    assert 0 <= left and left + cell["width"] <= WIDTH and top + cell["height"] <= HEIGHT, (frame, cell)
    box = (int(left), int(top), int(left + cell["width"]), int(top + cell["height"]))
    levels = image.convert("L").crop(box).histogram()  # pixels per grey level, 0 = black
    assert sum(levels[200:]) and sum(levels[:100]) > 10, "the rsum cell is not painted in the screenshot"
