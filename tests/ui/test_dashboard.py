"""`lorakit dashboard`: run status from files, the API, and the page in a real browser.

The browser tests drive the system Chromium through chromedriver (conftest.browser; `make test`
installs Debian's `chromium` and `chromium-driver` when missing). Without them the tests fail,
unless LORAKIT_ALLOW_NO_BROWSER=1 allows them to be skipped. With LORAKIT_SCREENSHOTS=DIR the views are
also saved there as PNG files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lorakit.core.config import DashboardConfig, DataCheckConfig, EvalConfig
from lorakit.inference.access import Access
from lorakit.ui import rundir
from lorakit.ui.dashboard import Dashboard, build_dashboard_app

from ..conftest import assemble_rows, css, serve_in_thread, tiny_train_config, wait, write_jsonl

KEY = "sk-dashboard-test"


# ------------------------------------------------------------------------------------------------
# Runs on disk


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> Path:
    """A runs directory: a trained and evaluated tiny run, a copy of it with two settings changed,
    a run being trained (metrics without a summary, just written) and a damaged one."""
    from lorakit.data.doctor import check
    from lorakit.training.train import train
    from lorakit.workflows.evaluate import evaluate

    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root.parent / "data.jsonl", assemble_rows(40))
    tuned = train(tiny_train_config(tiny_llama, data, root / "tuned", val_size=8, eval_steps=4))
    evaluate(
        EvalConfig(
            adapter=str(tuned),
            dataset=str(data),
            output_dir=str(tuned / "eval"),
            max_rows=3,
            max_new_tokens=4,
            compare_base=True,
            failures=2,
        )
    )
    check(
        DataCheckConfig(base_model=str(tiny_llama), dataset=str(data), output=str(tuned / "data_check.json"))
    )
    other = root / "other"
    shutil.copytree(
        tuned, other, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "eval", "data_check.json")
    )
    settings = (other / "lorakit.yaml").read_text()
    settings = settings.replace("lora_r: 4\n", "lora_r: 8\n").replace(
        "learning_rate: 0.001\n", "learning_rate: 0.002\n"
    )
    (other / "lorakit.yaml").write_text(settings)
    live = root / "live"
    live.mkdir()
    shutil.copy(tuned / "lorakit.yaml", live)
    write_jsonl(live / "metrics.jsonl", [_row(s) for s in (1, 2, 3)])
    damaged = root / "sweeps" / "damaged"
    damaged.mkdir(parents=True)
    (damaged / "metrics.jsonl").write_text(json.dumps(_row(1)) + "\n" + '{"step": 2, "loss": 1.')
    (damaged / "adapter_config.json").write_text("{}")  # an adapter without a manifest
    return root


def _row(step: int) -> dict:
    return {
        "step": step,
        "epoch": step / 10,
        "loss": 3.0 / step,
        "learning_rate": 1e-3,
        "num_input_tokens_seen": 100 * step,
        "tokens_per_second": 50.0 + step,
    }


def loss_rows(run: Path) -> int:
    return sum("loss" in r and not r.get("summary") for r in rundir.read_metrics(run / "metrics.jsonl").rows)


def _serve(cfg: DashboardConfig, api_key: str = ""):
    board = Dashboard(cfg)
    url, stop = serve_in_thread(build_dashboard_app(board, Access(key=api_key)))
    return url, stop, board


@pytest.fixture(scope="module")
def site(runs):
    url, stop, board = _serve(DashboardConfig(runs_dir=str(runs), threads=1))
    yield url
    stop()
    board.chat.close()


def get(url: str, key: str = "") -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------------------
# Status rules and the API


def _write_run(path: Path, rows: list[dict], age_s: float = 0.0, adapter: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "lorakit.yaml").write_text("lora_r: 4\n")
    write_jsonl(path / "metrics.jsonl", rows)
    if adapter:
        (path / "adapter_config.json").write_text("{}")
    then = time.time() - age_s
    for f in path.iterdir():
        os.utime(f, (then, then))
    return path


@pytest.mark.parametrize(
    ("rows", "age_s", "adapter", "alive", "status"),
    [
        ([_row(1)], 5, False, False, "running"),
        ([_row(1)], 3600, False, False, "interrupted"),  # killed without a summary line
        ([_row(1)], 3600, False, True, "running"),  # a process the dashboard started is alive
        ([_row(1), {"summary": True, "status": "finished"}], 5, True, False, "finished"),
        ([_row(1), {"summary": True, "status": "diverged"}], 5, False, False, "diverged"),
        ([_row(1), {"summary": True, "status": "paused"}], 5, False, False, "paused"),
        ([_row(1), {"summary": True, "status": "interrupted"}], 5, False, False, "interrupted"),
        ([{"summary": True, "status": "no steps"}], 5, False, False, "failed"),
        ([_row(1), {"summary": True, "status": "paused"}, _row(2)], 5, False, False, "running"),  # resumed
        ([_row(1)], 3600, True, False, "finished"),  # an adapter with no summary line
    ],
)
def test_status_from_the_files(tmp_path, rows, age_s, adapter, alive, status):
    run = _write_run(tmp_path / "run", rows, age_s, adapter)
    assert rundir.summarize(run, tmp_path, stale_after=600, alive=alive).status == status


def test_config_diff_holds_only_the_keys_that_differ():
    a = {"lora_r": 4, "learning_rate": 1e-3, "dataset": "d", "output_dir": "x"}
    b = {"lora_r": 8, "learning_rate": 1e-3, "dataset": "d", "output_dir": "y", "seed": 1}
    assert rundir.config_diff([a, b]) == {"lora_r": [4, 8], "seed": [None, 1]}


def test_fifty_runs_are_listed(tmp_path, runs):
    """50 runs of 300 metrics lines each: the list answers with all of them (the time is printed)."""
    rows = "".join(json.dumps(_row(s)) + "\n" for s in range(1, 301))
    rows += json.dumps({"summary": True, "status": "finished", "tokens_per_second": 55.0}) + "\n"
    for i in range(50):
        run = tmp_path / "many" / f"group{i % 5}" / f"run{i:02d}"
        run.mkdir(parents=True)
        shutil.copy(runs / "tuned" / "lorakit.yaml", run)
        shutil.copy(runs / "tuned" / "manifest.json", run)
        (run / "metrics.jsonl").write_text(rows)
        (run / "checkpoint-300").mkdir()
    url, stop, board = _serve(DashboardConfig(runs_dir=str(tmp_path / "many")))
    try:
        start = time.perf_counter()
        status, listing = get(url + "/api/runs")
        cold = time.perf_counter() - start
        start = time.perf_counter()
        get(url + "/api/runs")
        warm = time.perf_counter() - start
    finally:
        stop()
    print(f"50 runs listed in {cold:.3f} s (then {warm:.3f} s from the cache)")
    assert status == 200 and len(listing["runs"]) == 50
    assert {r["status"] for r in listing["runs"]} == {"finished"}
    assert all(r["steps"] == 300 and r["tokens_per_second"] == 55.0 for r in listing["runs"])
    assert cold < 5.0  # the goal is 1 s; generous here, the machine is shared


def test_damaged_runs_are_listed_with_notes(site):
    status, listing = get(site + "/api/runs")
    assert status == 200
    damaged = next(r for r in listing["runs"] if r["id"] == "sweeps/damaged")
    assert any("last line is incomplete" in n for n in damaged["notes"])
    assert any("no manifest.json" in n for n in damaged["notes"])
    status, detail = get(site + "/api/run?id=sweeps/damaged")
    assert status == 200 and detail["summary"]["steps"] == 1
    status, metrics = get(site + "/api/metrics?id=sweeps/damaged")
    assert status == 200 and [r["step"] for r in metrics["rows"]] == [1]
    assert get(site + "/api/run?id=../..")[0] == 404


def test_an_api_key_guards_the_api_not_the_page(runs):
    url, stop, _ = _serve(DashboardConfig(runs_dir=str(runs)), api_key=KEY)
    try:
        assert get(url + "/api/runs")[0] == 401
        assert get(url + "/api/runs", key="wrong")[0] == 401
        assert get(url + "/api/runs", key=KEY)[0] == 200
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.status == 200 and b"lorakit" in r.read()
    finally:
        stop()


def test_eval_report_and_failures_are_read(site):
    status, detail = get(site + "/api/run?id=tuned")
    [report] = detail["evals"]
    assert report["where"] == "eval" and {"base", "tuned", "delta"} <= set(report)
    assert report["failures"] and {"prompt", "reference", "answer"} <= set(report["failures"][0])
    assert report["failures"][0]["reference"].startswith("A9 ")


def test_the_data_check_report_with_its_mask_preview(site):
    status, detail = get(site + "/api/run?id=tuned")
    report = detail["data_check"]
    assert len(report["lengths"]) == 40 and 0 < report["supervised_fraction"] < 1
    [row] = report["preview"][:1]
    supervised = "".join(text for text, on in row["pieces"] if on)
    assert supervised.startswith("A9 00") and "Assemble 0." not in supervised
    assert "".join(text for text, _ in row["pieces"]).count("Assemble 0.") == 1


@pytest.mark.slow  # starts `lorakit train` in another process
def test_plan_then_train_from_the_form(site, runs, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", assemble_rows(8))
    form = {
        "base_model": str(tiny_llama),
        "dataset": str(data),
        "output_dir": str(runs / "from-form"),
        "max_steps": "2",
        "lora_r": "4",
        "batch_size": "4",
        "gradient_accumulation_steps": "1",
        "target_modules": "q_proj v_proj",
        "report_to": "none",
        "gpu": "t4",
    }
    status, bad = post(site + "/api/plan", {**form, "lora_r": "0"})
    assert status == 400 and "--lora_r" in bad["error"]
    status, plan = post(site + "/api/plan", form)
    assert status == 200 and plan["fits"] is True and plan["gpu"] == "NVIDIA T4"
    assert "--lora_r 4" in plan["command"] and plan["total_gib"] > 0
    status, job = post(site + "/api/train", form)
    assert status == 200 and job["running"] and job["run"] == "from-form"
    end = time.time() + 240
    while job["running"] and time.time() < end:
        time.sleep(1)
        job = get(site + f"/api/jobs/{job['number']}")[1]
    assert job["returncode"] == 0, job["output"]
    assert "adapter written" in job["output"] and job["command"].startswith("lorakit train ")
    listing = get(site + "/api/runs")[1]
    assert next(r for r in listing["runs"] if r["id"] == "from-form")["status"] == "finished"


# ------------------------------------------------------------------------------------------------
# In a real browser


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("LORAKIT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"dashboard-{name}.png"))


def test_browser_runs_list_and_a_finished_runs_curve(browser, site, runs):
    browser.get(site + "/#/runs")
    wait(browser, 20, lambda d: css(d, 'tr[data-run="tuned"][data-status="finished"]'), "no finished run")
    rows = {r.get_attribute("data-run"): r for r in css(browser, "#runs-body tr")}
    assert set(rows) >= {"tuned", "other", "live", "sweeps/damaged"}
    assert rows["live"].get_attribute("data-status") == "running"
    assert "last line is incomplete" in rows["sweeps/damaged"].text
    screenshot(browser, "runs")
    browser.get(site + "/#/run/tuned")
    want = loss_rows(runs / "tuned")
    assert want == 12
    train_line = '#chart-loss polyline.series[data-name="train loss"]'
    wait(browser, 20, lambda d: css(d, train_line), "no train loss curve")
    [line] = css(browser, train_line)
    assert int(line.get_attribute("data-points")) == want
    assert len(line.get_attribute("points").split()) == want
    evals = [
        r
        for r in rundir.read_metrics(runs / "tuned" / "metrics.jsonl").rows
        if "eval_loss" in r and not r.get("summary")
    ]
    assert len(css(browser, '#chart-loss polyline.series[data-name="validation loss"]')) == 1
    assert len(css(browser, "#chart-loss circle.dot")) == len(evals) == 3
    assert css(browser, "#chart-learning_rate polyline.series") and css(browser, "table.eval")
    assert css(browser, ".mask .sup") and css(browser, ".mask .ctx")  # the data check's mask preview
    # The same curve by tokens seen: the x axis changes, the points stay.
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#x-axis")[0]).select_by_value("tokens")
    wait(browser, 10, lambda d: "tokens seen" in css(d, "#chart-loss svg")[0].text, "x axis not by tokens")
    wait(
        browser, 10, lambda d: int(css(d, train_line)[0].get_attribute("data-points")) == want, "points lost"
    )
    # A damaged run opens with its notes, not an error.
    browser.get(site + "/#/run/" + "sweeps%2Fdamaged")
    wait(browser, 20, lambda d: css(d, "ul.notes"), "no notes on the damaged run")
    assert not css(browser, "p.error")


def test_browser_sees_a_running_training_grow(browser, site, runs):
    browser.get(site + "/#/run/live")
    line = '#chart-loss polyline.series[data-name="train loss"]'
    wait(
        browser,
        20,
        lambda d: css(d, line) and css(d, line)[0].get_attribute("data-points") == "3",
        "no curve",
    )
    with open(runs / "live" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_row(4)) + "\n" + json.dumps(_row(5)) + "\n")
    start = time.perf_counter()
    wait(
        browser,
        5,
        lambda d: css(d, line)[0].get_attribute("data-points") == "5",
        "new steps not shown in 5 s",
    )
    print(f"new steps drawn {time.perf_counter() - start:.2f} s after they were written")


def test_browser_compare_shows_only_the_differing_keys(browser, site):
    browser.get(site + "/#/runs")
    wait(browser, 20, lambda d: css(d, 'input[data-run="other"]'), "no runs list")
    css(browser, 'input[data-run="tuned"]')[0].click()
    css(browser, 'input[data-run="other"]')[0].click()
    css(browser, "#compare-selected")[0].click()
    wait(browser, 20, lambda d: css(d, "#diff tr.diff-row"), "no settings diff")
    keys = {r.get_attribute("data-key") for r in css(browser, "#diff tr.diff-row")}
    assert keys == {"learning_rate", "lora_r"}
    wait(browser, 20, lambda d: len(css(d, "#chart-loss polyline.series")) >= 2, "curves not overlaid")
    screenshot(browser, "compare")


def test_browser_chat_streams_an_answer(browser, site):
    browser.get(site + "/#/chat/tuned")
    wait(browser, 20, lambda d: css(d, "#chat-input"), "no chat view")
    css(browser, "#chat-max-tokens")[0].clear()
    css(browser, "#chat-max-tokens")[0].send_keys("12")
    css(browser, "#chat-temperature")[0].clear()
    css(browser, "#chat-temperature")[0].send_keys("0")
    css(browser, "#chat-input")[0].send_keys("Assemble LDA #$10")
    css(browser, "#chat-send")[0].click()
    answer = ".msg.assistant"
    wait(browser, 240, lambda d: css(d, answer + '[data-done="true"]'), "no answer")
    [reply] = css(browser, answer)
    assert not css(browser, answer + " .error"), reply.text
    assert int(reply.get_attribute("data-chunks")) >= 2  # it arrived in pieces, as a stream
    assert reply.text.strip()
    screenshot(browser, "chat")


def test_browser_new_run_form_has_every_train_field(browser, site, runs):
    import dataclasses

    from lorakit.core.config import TrainConfig
    from lorakit.ui.dashboard import FORM_REFUSED, PLAN_FIELDS

    browser.get(site + "/#/new")
    wait(browser, 20, lambda d: css(d, "#train-form [name=output_dir]"), "no form")
    names = {e.get_attribute("name") for e in css(browser, "#train-form [name]")}
    want = {f.name for f in dataclasses.fields(TrainConfig)} - FORM_REFUSED | set(PLAN_FIELDS)
    assert names == want
    output_dir = css(browser, "#train-form [name=output_dir]")[0].get_attribute("value")
    assert output_dir.startswith(str(runs.resolve()))  # a new run lands where the dashboard looks
