"""The OpenAI-compatible API, driven by the real `openai` package against a live uvicorn:
chat and text completions, streamed and not, the preference as extra_body, n, logprobs,
usage, stop sequences, errors in OpenAI's shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from model_store.loader import load_store
from tests.http_server import running_server

CHAT = [{"role": "user", "content": "How do I bake bread?"}]
EXPLICIT = {"guidance": {"mode": "explicit", "gamma": 2.0}}


@pytest.fixture(scope="module")
def url(client_url):
    return client_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def chat(client, **kwargs):
    kwargs = {"max_tokens": 6, **kwargs}
    return client.chat.completions.create(model="tiny", messages=CHAT, **kwargs)


def streamed_chat(client, **kwargs) -> tuple[dict[int, str], list]:
    chunks = list(chat(client, stream=True, **kwargs))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


def test_chat_completion_reports_text_usage_and_the_preference_used(client):
    answer = chat(client, extra_body={"preference": {"helpful": 1.0}, **EXPLICIT})
    assert answer.object == "chat.completion" and answer.model == "tiny"
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens >= 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6
    mage = answer.model_extra["mage"]
    assert mage["preference"] == [1.0, 0.0]
    assert mage["lambda"] == pytest.approx([1.75, -0.75])  # B^-1 mu, beta 0.7
    assert mage["guidance"] == {"mode": "explicit", "gamma": 2.0}
    assert mage["merge_method"] == "bone-soup"


def test_chat_stream_equals_the_whole_answer_and_ends_with_usage(client):
    whole = chat(client, extra_body=EXPLICIT).choices[0].message.content
    texts, chunks = streamed_chat(
        client, stream_options={"include_usage": True}, extra_body=EXPLICIT
    )
    assert texts == {0: whole}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["mage"]["preference"] == [0.5, 0.5]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_extra_body_preference_changes_the_output(client):
    texts = {
        str(mu): chat(client, extra_body={"preference": mu, **EXPLICIT}).choices[0].message.content
        for mu in ([1, 0], [0, 1])
    }
    assert texts["[1, 0]"] != texts["[0, 1]"]


def test_text_completion_stream_and_not_agree(client):
    kwargs = {"model": "tiny", "prompt": "The best way to learn is", "max_tokens": 6}
    whole = client.completions.create(**kwargs, extra_body={"preference": [0.2, 0.8]})
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(**kwargs, stream=True, extra_body={"preference": [0.2, 0.8]})
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert whole.model_extra["mage"]["preference"] == [0.2, 0.8]
    echoed = client.completions.create(**kwargs, echo=True, extra_body={"preference": [0.2, 0.8]})
    assert echoed.choices[0].text == kwargs["prompt"] + whole.choices[0].text


def test_n_choices_sample_with_their_own_seeds_reproducibly(client):
    kwargs = {"n": 3, "temperature": 1.5, "seed": 7, "max_tokens": 8}
    first = [c.message.content for c in chat(client, **kwargs).choices]
    assert len(first) == 3 and len(set(first)) > 1  # seeds 7, 8, 9
    assert [c.message.content for c in chat(client, **kwargs).choices] == first
    texts, _ = streamed_chat(client, **kwargs)
    assert [texts[i] for i in range(3)] == first
    assert chat(client, n=2).usage.completion_tokens == 12  # summed over choices


def test_logprobs_and_top_logprobs(client):
    answer = chat(client, logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        best = [t.logprob for t in entry.top_logprobs]
        assert best == sorted(best, reverse=True) and entry.logprob <= best[0] + 1e-6
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    text = client.completions.create(model="t", prompt="Hi", max_tokens=4, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    for stream in (False, True):  # offsets count the echoed prompt
        echoed = client.completions.create(
            model="t", prompt="Hi", max_tokens=3, logprobs=1, echo=True, stream=stream
        )
        first = next(iter(echoed)) if stream else echoed
        assert first.choices[0].logprobs.text_offset[0] == len("Hi")
    assert chat(client).choices[0].logprobs is None


def test_stop_sequences_are_cut_out_as_openai_does(client):
    whole = chat(client, max_tokens=12, extra_body=EXPLICIT).choices[0].message.content
    # two characters first seen past the start: the answer must end right before them
    at = next(k for k in range(3, len(whole) - 1) if whole.index(whole[k : k + 2]) == k)
    stop = whole[at : at + 2]
    cut = chat(client, max_tokens=12, stop=[stop], extra_body=EXPLICIT).choices[0]
    assert cut.message.content == whole[: whole.index(stop)]
    assert cut.finish_reason == "stop"
    texts, _ = streamed_chat(client, max_tokens=12, stop=stop, extra_body=EXPLICIT)
    assert texts[0] == cut.message.content


@pytest.mark.parametrize(
    ("extra", "param", "text"),
    [
        ({"preference": [1, 2, 3]}, "preference", "must have 2 weights"),
        ({"preference": {"funny": 1}}, "preference", "unknown objective"),
        ({"preference": [-1, 1]}, "preference.0", ">= 0"),
        ({"guidance": {"gamma": 1000}}, "guidance.gamma", "must be <= 100"),
        ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"logit_bias": {"5": 0, "7": 1}}, "logit_bias.7", "biases of 0"),
        ({"top_logprobs": 2}, "top_logprobs", "`top_logprobs` needs `logprobs`: true"),
        ({"top_logprobs": 0, "logprobs": False}, "top_logprobs", "needs `logprobs`"),
    ],
)
def test_bad_extra_fields_raise_the_clients_422(client, extra, param, text):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        chat(client, extra_body=extra)
    error = raised.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "validation"
    assert error["param"] == param and text in error["message"]


def test_a_logit_bias_of_zeros_is_accepted_and_changes_nothing(client):
    plain = chat(client).choices[0].message.content
    assert chat(client, logit_bias={"5": 0, "17": 0.0}).choices[0].message.content == plain


def test_errors_on_v1_use_openais_shape_with_tgis_status_codes(url):
    too_long = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 99})
    assert too_long.status_code == 422
    assert too_long.json()["error"]["message"].endswith("`max_tokens` must be <= 16. Given: 99")
    assert too_long.json()["error"]["param"] == "max_tokens"
    not_json = httpx.post(f"{url}/v1/completions", content=b"{", timeout=10)
    assert not_json.status_code == 422 and not_json.json()["error"]["code"] == "validation"
    missing = httpx.get(f"{url}/v1/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    tgi = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 99}})
    assert tgi.status_code == 422 and set(tgi.json()) == {"error", "error_type"}


def test_models_lists_the_store(client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "mage"


def test_api_keys_guard_the_v1_routes(tiny_store):
    with running_server(load_store(tiny_store, "cpu", "float32"), api_key=["k1"]) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(wrong)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        assert chat(right).choices[0].message.content


def test_store_checks_use_this_apis_field_names(url, tiny_store):
    with running_server(load_store(tiny_store, "cpu", "float32"), max_input_tokens=3) as small:
        long = httpx.post(f"{small}/v1/completions", json={"prompt": "How do I bake bread?"})
        assert long.status_code == 422
        error = long.json()["error"]
        assert error["param"] == "prompt" and error["message"].startswith("`prompt` must have")
        chat = httpx.post(f"{small}/v1/chat/completions", json={"messages": CHAT})
        assert chat.json()["error"]["param"] == "messages"
    # the tiny model's context is 256 tokens
    over = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi " * 250, "max_tokens": 16})
    assert over.status_code == 422 and over.json()["error"]["param"] == "max_tokens"
    assert "`prompt` tokens + `max_tokens` must be <= 256" in over.json()["error"]["message"]
