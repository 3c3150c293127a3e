"""leaderboard.html in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) opens the page made from two small real runs and the test reads the
rendered DOM: every adapter and dataset is there, a header click reorders the rows, the
plot is drawn. A screenshot is saved under the test's temporary folder.

Without Chromium the test skips with the reason; under CI (ATPT_CI=1, set by .ci/run, which
installs Chromium) it fails instead, so a missing browser is never a silent pass, unless
.ci/run could not install it (ATPT_NO_BROWSER, the reason): then it skips saying so."""

import os
import shutil

import pytest
from atpt_plugin.adapters import cli
from tiny_runs import make_workspace, run_eval


def _missing_browser():
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the [dev] extra)")
    return missing


def _browser():
    missing = _missing_browser()
    if missing:
        reason = (
            f"no headless browser: {', '.join(missing)} missing; install with `apt-get install -y chromium "
            "chromium-driver` and `pip install -c constraints.txt -e '.[dev]'`"
        )
        if os.environ.get("ATPT_NO_BROWSER"):
            pytest.skip(f"{reason} ({os.environ['ATPT_NO_BROWSER']})")
        if os.environ.get("ATPT_CI"):
            pytest.fail(f"ATPT_CI is set and {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_leaderboard_page_in_headless_chromium(tmp_path):
    driver = _browser()  # skip (or fail under CI) before the runs when there is no browser
    try:
        root = make_workspace(tmp_path)
        runs = [run_eval(root, "pets", "pets"), run_eval(root, "folder", "imagefolder")]
        assert cli.main(["leaderboard", *map(str, runs), "--out", str(tmp_path / "board")]) == 0
        page = tmp_path / "board" / "leaderboard.html"
        assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")  # nothing fetched
        driver.get(page.as_uri())
        from selenium.webdriver.common.by import By

        table = driver.find_element(By.ID, "table-1")
        rows = lambda: [r.get_attribute("data-adapter") for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert sorted(rows()) == ["ens", "zeroshot"]
        headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        for dataset in ("pets", "imagefolder", "average"):
            assert any(h.startswith(f"{dataset}: clean") for h in headers), headers
        worst = table.find_elements(By.CSS_SELECTOR, "td.worst")
        assert len(worst) == 2 * 3  # worst-case cells highlighted: two datasets and the average, per adapter
        assert worst[0].value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"

        name = table.find_element(By.CSS_SELECTOR, "thead th")
        name.click()
        assert rows() == ["ens", "zeroshot"]
        name.click()
        assert rows() == ["zeroshot", "ens"]
        column = headers.index("s / image")
        seconds = lambda: [
            float(r.find_elements(By.TAG_NAME, "td")[column].get_attribute("data-value"))
            for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        ]
        table.find_elements(By.CSS_SELECTOR, "thead th")[column].click()
        ascending = rows()
        assert seconds() == sorted(seconds()) and len(set(seconds())) == 2
        table.find_elements(By.CSS_SELECTOR, "thead th")[column].click()
        assert rows() == ascending[::-1] and seconds() == sorted(seconds(), reverse=True)

        plot = driver.find_element(By.ID, "plot-1")
        points = plot.find_elements(By.CSS_SELECTOR, "circle.point")
        assert sorted(p.get_attribute("data-adapter") for p in points) == ["ens", "zeroshot"]
        assert all(p.size["width"] > 0 for p in points)  # drawn, not only present
        assert plot.find_elements(By.CSS_SELECTOR, "circle.front")  # at least one adapter is on the front
        text = driver.find_element(By.TAG_NAME, "body").text
        assert all(str(run) in text for run in runs) and "torch" in text  # each run with its versions
        assert driver.save_screenshot(str(tmp_path / "leaderboard.png"))
        assert (tmp_path / "leaderboard.png").stat().st_size > 10_000
    finally:
        driver.quit()
