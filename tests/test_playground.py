"""The playground page (GET /) in a real headless Chromium: it loads from a running server,
builds its sliders from /info, streams an answer token by token, reports lambda, and
compares preferences side by side."""

from __future__ import annotations

import httpx
import pytest

from model_store.loader import load_store
from tests.common import build_tiny_store
from tests.http_server import running_server


@pytest.fixture(scope="module")
def url(tiny_store):
    store = load_store(tiny_store, "cpu", "float32")
    with running_server(store, max_new_tokens=12) as url:
        yield url


def test_the_page_is_served_from_the_package_and_stays_on_this_server(url):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    assert httpx.post(f"{url}/", json={"inputs": "Hi"}).status_code == 200  # POST / is TGI


def test_sliders_stream_lambda_and_compare_in_chromium(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{url}/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    ends = browser.find_element(By.CSS_SELECTOR, "#pref-main .ends").text.split()
    assert ends == ["helpful", "harmless"]  # named from /info
    slider = browser.find_element(By.ID, "pref-main-slider")
    slider.send_keys(Keys.END)  # all the way to "harmless": mu = (0, 1)
    assert browser.find_element(By.CSS_SELECTOR, "#pref-main .mu").text == "μ = (0.00, 1.00)"
    browser.find_element(By.ID, "mode").send_keys("explicit")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("8")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("How do I bake bread?")
    browser.find_element(By.ID, "send").click()
    answer = browser.find_element(By.ID, "answer")
    wait.until(lambda d: answer.get_attribute("data-done") == "true")
    assert answer.get_attribute("data-tokens") == "8"  # appended event by event
    assert answer.text.strip()
    meta = browser.find_element(By.ID, "answer-meta").text
    assert "λ = (-0.75, 1.75)" in meta and "μ = (0.00, 1.00)" in meta and "explicit" in meta

    browser.find_element(By.ID, "compare").click()
    outputs = [browser.find_element(By.ID, f"compare-answer-{i}") for i in range(3)]
    wait.until(lambda d: all(o.get_attribute("data-done") == "true" for o in outputs))
    texts = [o.text for o in outputs]
    assert all(texts) and texts[0] != texts[2]  # mu = (1, 0) vs (0, 1)
    metas = browser.find_elements(By.CSS_SELECTOR, ".column .meta")
    assert "λ = (1.75, -0.75)" in metas[0].text and "λ = (-0.75, 1.75)" in metas[2].text


def test_three_objectives_get_three_sliders_that_stay_on_the_simplex(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    root = build_tiny_store(tmp_path / "s3", objectives=("a", "b", "c"), value_kind=None)
    with running_server(load_store(root, "cpu", "float32")) as url:
        browser.get(f"{url}/")
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready")
        )
        labels = browser.find_elements(By.CSS_SELECTOR, "#pref-main label")
        assert [label.text for label in labels] == ["a", "b", "c"]
        mu = browser.find_element(By.CSS_SELECTOR, "#pref-main .mu")
        assert mu.text == "μ = (0.33, 0.33, 0.33)"
        browser.find_element(By.ID, "pref-main-slider-0").send_keys(Keys.END)
        assert mu.text == "μ = (1.00, 0.00, 0.00)"  # the others gave way
        browser.find_element(By.ID, "pref-main-slider-2").send_keys(Keys.RIGHT, Keys.RIGHT)
        weights = [float(w) for w in mu.text.strip("μ =()").split(",")]
        assert weights[2] == pytest.approx(0.1) and sum(weights) == pytest.approx(1.0)
