"""TGI's clients, unchanged, against a live server: huggingface_hub's InferenceClient
(text_generation through POST /, chat_completion through /v1) and TGI's own `text-generation`
Client; the preference through adapter_id, a header or extra_body; every TGI parameter."""

from __future__ import annotations

import httpx
import huggingface_hub.constants
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError

PROMPT = "How do I bake bread?"


@pytest.fixture(scope="module")
def url(client_url):
    return client_url


@pytest.fixture(scope="module")
def hub(url):
    """The client as a user of a local server runs it. huggingface_hub 1.x+ refuses every
    request, even to 127.0.0.1, when HF_HUB_OFFLINE is set (as `make test` sets it so that
    nothing is downloaded); the flag is about the Hub, so it is lifted for this client only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(model=url)


def generate(url: str, **parameters) -> dict:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, **parameters}}
    response = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_text_generation_with_details_through_post_root(hub, url):
    out = hub.text_generation(PROMPT, max_new_tokens=6, details=True)
    reference = generate(url)
    assert out.generated_text == reference["generated_text"]
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 6
    assert [t.id for t in out.details.tokens] == [t["id"] for t in reference["details"]["tokens"]]
    assert out.details.prefill == []  # not asked for
    assert hub.text_generation(PROMPT, max_new_tokens=6) == reference["generated_text"]


def test_text_generation_streams_through_post_root(hub, url):
    events = list(hub.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True))
    assert [e.index for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1].details.finish_reason == "length"
    assert events[-1].generated_text == generate(url)["generated_text"]
    texts = list(hub.text_generation(PROMPT, max_new_tokens=6, stream=True))
    assert "".join(texts) == events[-1].generated_text


def test_adapter_id_carries_the_preference_and_guidance(hub, url):
    steered = hub.text_generation(
        PROMPT, max_new_tokens=6, details=True, adapter_id="helpful=1,mode=explicit,gamma=2"
    )
    expected = generate(url, preference={"helpful": 1}, guidance={"mode": "explicit", "gamma": 2})
    assert steered.generated_text == expected["generated_text"]
    extra = steered.details  # the server's own fields ride along as extra attributes
    assert extra.preference == [1.0, 0.0] and extra.guidance == {"mode": "explicit", "gamma": 2.0}
    other = hub.text_generation(PROMPT, max_new_tokens=6, adapter_id="0,1,mode=explicit,gamma=2")
    assert other != steered.generated_text


def test_tgi_parameters_that_make_sense_are_honoured(hub, url):
    out = hub.text_generation(
        PROMPT,
        max_new_tokens=5,
        details=True,
        decoder_input_details=True,
        top_n_tokens=3,
        return_full_text=True,
        repetition_penalty=1.5,
        truncate=3,
        do_sample=True,
        typical_p=0.9,
        seed=4,
    )
    details = out.details
    assert len(details.prefill) == 3 and details.prefill[0].logprob is None  # truncated to 3
    assert all(isinstance(p.logprob, float) for p in details.prefill[1:])
    assert len(details.top_tokens) == 5 and all(len(top) == 3 for top in details.top_tokens)
    tail = "".join(p.text for p in details.prefill)
    assert out.generated_text.startswith(PROMPT) and PROMPT.endswith(tail)
    assert details.seed == 4
    again = generate(
        url,
        max_new_tokens=5,
        repetition_penalty=1.5,
        truncate=3,
        do_sample=True,
        typical_p=0.9,
        seed=4,
    )
    assert out.generated_text == PROMPT + again["generated_text"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"watermark": True}, "watermark"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"grammar": {"type": "regex", "value": "a+("}}, "grammar"),
        ({"adapter_id": "funny=1"}, "adapter_id"),
    ],
)
def test_what_the_server_cannot_honour_is_a_422_naming_the_field(hub, kwargs, field):
    with pytest.raises(HubValidationError, match=field):
        hub.text_generation(PROMPT, max_new_tokens=4, **kwargs)


def test_chat_completion_goes_through_the_openai_routes(hub):
    messages = [{"role": "user", "content": PROMPT}]
    steer = {"preference": [1, 0], "guidance": {"mode": "explicit", "gamma": 2}}
    out = hub.chat_completion(messages, max_tokens=6, extra_body=steer)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.mage["preference"] == [1.0, 0.0]
    chunks = list(hub.chat_completion(messages, max_tokens=6, stream=True, extra_body=steer))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == out.choices[0].message.content
    other = hub.chat_completion(messages, max_tokens=6, extra_body={**steer, "preference": [0, 1]})
    assert other.choices[0].message.content != out.choices[0].message.content


@pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")  # the client's own call
def test_text_generation_client_works_unchanged(url):
    text_generation = pytest.importorskip(
        "text_generation", reason="TGI's text-generation client is not installed"
    )
    client = text_generation.Client(url)
    response = client.generate(PROMPT, max_new_tokens=6, decoder_input_details=True)
    assert response.generated_text == generate(url)["generated_text"]
    assert len(response.details.tokens) == 6 and response.details.prefill[0].logprob is None
    stream = list(client.generate_stream(PROMPT, max_new_tokens=6))
    assert "".join(r.token.text for r in stream) == response.generated_text
    assert stream[-1].details.generated_tokens == 6
    chat = client.chat([text_generation.types.Message(role="user", content=PROMPT)], max_tokens=4)
    assert chat.choices[0].message.content and chat.usage["completion_tokens"] == 4
    # A client that cannot send the preference in its body sends it as a header.
    steered = text_generation.Client(url, headers={"X-Mage-Preference": "helpful=1,mode=explicit"})
    expected = generate(url, preference={"helpful": 1}, guidance={"mode": "explicit"})
    assert steered.generate(PROMPT, max_new_tokens=6).generated_text == expected["generated_text"]
