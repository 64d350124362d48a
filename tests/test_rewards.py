"""Tests of objectives.rewards: built-ins, adapters, registry, batching and error reporting."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from objectives.rewards import (
    FunctionReward,
    Reward,
    RewardError,
    RewardSpecError,
    available_rewards,
    get_reward,
    register_reward,
    unregister_reward,
)
from objectives.rewards.builtin import BrevityReward, brevity_score

POSITIVE = "What a wonderful day! I love this, it is great and makes me so happy."
NEGATIVE = "This is terrible. I hate it, it is awful and makes me miserable and angry."

PROMPTS = [
    "How do I bake sourdough bread at home?",
    "My flight was cancelled, what are my options?",
    "Can you explain how vaccines train the immune system?",
    "Write a two-line poem about autumn rain.",
    "",
]
RESPONSES = [
    "Feed your starter, mix flour, water and salt, let it rise overnight, then bake hot.",
    "Ask the airline to rebook you on the next flight or request a refund.",
    "Vaccines show the immune system a harmless piece of a germ so it learns to fight it.",
    "Grey drops tap the window glass; the maple lets its red leaves pass.",
    "An empty prompt still gets a response.",
]


# -- built-ins ---------------------------------------------------------------------------------


def test_builtins_are_registered_and_cheap_to_import():
    assert {"relevance", "positivity", "brevity"} <= set(available_rewards())
    assert get_reward("brevity") is get_reward("brevity")  # one cached instance per spec
    # importing the package and looking a model-backed reward up imports no torch / model
    code = (
        "import sys; from objectives.rewards import get_reward; r = get_reward('relevance'); "
        "assert not r.loaded; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_positivity_orders_positive_above_negative():
    reward = get_reward("positivity")
    pos, neg, neutral = reward(["How was it?"] * 3, [POSITIVE, NEGATIVE, "It was on Tuesday."])
    assert pos > 0.5
    assert neg < -0.5
    assert neg < neutral < pos
    assert all(-1.0 <= s <= 1.0 for s in (pos, neg, neutral))


def test_brevity_formula_and_monotonicity():
    reward = BrevityReward(target_words=10, scale=10)
    lengths = [0, 1, 5, 10, 11, 15, 20, 40, 100, 400]
    scores = reward(["q"] * len(lengths), [" ".join(["word"] * n) for n in lengths])
    assert scores[:4] == [1.0, 1.0, 1.0, 1.0]  # up to the target
    tail = scores[3:]
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False))  # strictly decreasing after
    assert all(0.0 < s <= 1.0 for s in scores)
    assert scores[lengths.index(20)] == pytest.approx(0.5)  # 1 / (1 + ((20 - 10) / 10)^2)
    assert brevity_score(100) == pytest.approx(0.5)  # defaults: target 50 words, scale 50
    default = get_reward("brevity")
    short, long = default(["q", "q"], ["Yes.", "word " * 300])
    assert short == 1.0 and long < 0.05
    # whitespace of any kind separates words; leading/trailing whitespace is ignored
    assert reward(["q"], ["  a\tb\nc  "]) == reward(["q"], ["a b c"])


def test_batch_equals_one_by_one_for_cheap_rewards():
    for spec in ("positivity", "brevity"):
        reward = get_reward(spec)
        batched = reward(PROMPTS, RESPONSES)
        single = [reward([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
        assert batched == single, spec


def test_empty_batch_returns_empty_list_without_loading():
    reward = FunctionReward("never-called", lambda p, r: 1 / 0)
    assert reward([], []) == []


# -- relevance (loads all-MiniLM-L6-v2 once for the module) -------------------------------------


@pytest.fixture(scope="module")
def relevance() -> Reward:
    """The relevance reward, loaded once, with the network blocked during the load."""

    def no_network(*args, **kwargs):
        raise AssertionError("the relevance reward tried to open a network connection")

    original = socket.socket.connect
    socket.socket.connect = no_network  # type: ignore[method-assign]
    try:
        reward = get_reward("relevance").load()
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]
    assert reward.loaded
    return reward


def test_relevance_on_topic_above_off_topic(relevance):
    prompts = [
        "How do I bake sourdough bread at home?",
        "My flight was cancelled, what are my options?",
    ]
    on_topic = [
        "Mix flour, water, salt and an active starter, proof the dough overnight and bake it.",
        "You can ask the airline to rebook you on another flight or claim a refund.",
    ]
    off_topic = [
        "The central bank raised interest rates by a quarter point on Thursday.",
        "Octopuses have three hearts and blue blood.",
    ]
    on = relevance(prompts, on_topic)
    off = relevance(prompts, off_topic)
    for a, b in zip(on, off, strict=True):
        assert a > b + 0.2
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in on + off)
    # identical text is maximally similar
    assert relevance(["hello world"], ["hello world"])[0] == pytest.approx(1.0, abs=1e-5)


def test_relevance_batch_equals_one_by_one(relevance):
    batched = relevance(PROMPTS, RESPONSES)
    single = [relevance([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert batched == pytest.approx(single, abs=1e-5)
    # chunking inside one call does not change the result either
    small = type(relevance)(batch_size=2)
    small._state, small._loaded = relevance._state, True  # share the loaded model
    assert small(PROMPTS, RESPONSES) == pytest.approx(batched, abs=1e-5)


# -- module:function adapter ---------------------------------------------------------------------


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """An importable module ``my_rewards`` with a few reward callables."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            import math

            CALLS = []

            def overlap(prompts, responses):
                CALLS.append(len(prompts))
                out = []
                for p, r in zip(prompts, responses):
                    a, b = set(p.lower().split()), set(r.lower().split())
                    out.append(len(a & b) / max(1, len(a | b)))
                return out

            def too_few(prompts, responses):
                return [0.0] * (len(prompts) - 1)

            def nan_on_boom(prompts, responses):
                return [math.nan if "boom" in r else 1.0 for r in responses]

            def raises_on_boom(prompts, responses):
                if any("boom" in r for r in responses):
                    raise ValueError("cannot score explosions")
                return [1.0] * len(responses)

            def strings(prompts, responses):
                return ["1.0"] * len(responses)

            class Scorers:
                @staticmethod
                def length(prompts, responses):
                    return [float(len(r)) for r in responses]

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_module_function_adapter(reward_module):
    reward = get_reward(f"{reward_module}:overlap")
    assert reward.name == f"{reward_module}:overlap"
    scores = reward(["the cat sat", "a b"], ["the cat ran", "c d"])
    assert scores == [pytest.approx(0.5), 0.0]
    assert get_reward(f"{reward_module}:Scorers.length")(["x"], ["abcd"]) == [4.0]


def test_module_function_bad_specs(reward_module):
    with pytest.raises(RewardSpecError, match="no_such_module_xyz"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(RewardSpecError, match="no attribute 'missing'"):
        get_reward(f"{reward_module}:missing")
    with pytest.raises(RewardSpecError, match="not callable"):
        get_reward(f"{reward_module}:NOT_CALLABLE")


# -- errors ------------------------------------------------------------------------------------


def test_unknown_spec_lists_available_rewards():
    with pytest.raises(RewardSpecError) as info:
        get_reward("helpfulness")
    message = str(info.value)
    assert "helpfulness" in message
    for name in ("relevance", "positivity", "brevity", "hf-classifier:", "module:function"):
        assert name in message
    assert isinstance(info.value, ValueError)


def test_failing_input_is_named_and_truncated(reward_module):
    reward = get_reward(f"{reward_module}:raises_on_boom")
    long_prompt = "Tell me about fireworks. " * 40
    with pytest.raises(RewardError) as info:
        reward(["fine", long_prompt, "fine"], ["ok", "boom goes the rocket", "ok"])
    err = info.value
    message = str(err)
    assert f"{reward_module}:raises_on_boom" in message
    assert "cannot score explosions" in message
    assert "boom goes the rocket" in message  # the offending pair, not the first one
    assert "Tell me about fireworks." in message
    assert f"({len(long_prompt)} chars)" in message and len(message) < 600  # truncated
    assert err.index == 1 and err.response == "boom goes the rocket"


def test_non_finite_and_wrong_length_and_wrong_type_outputs_are_errors(reward_module):
    with pytest.raises(RewardError, match=r"non-finite.*#1.*boom"):
        get_reward(f"{reward_module}:nan_on_boom")(["a", "b"], ["fine", "boom"])
    with pytest.raises(RewardError, match=r"returned 1 scores for a batch of 2"):
        get_reward(f"{reward_module}:too_few")(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=r"invalid score.*str"):
        get_reward(f"{reward_module}:strings")(["a"], ["x"])
    with pytest.raises(RewardError, match=r"reward 'inf'.*non-finite"):
        FunctionReward("inf", lambda p, r: [math.inf])(["a"], ["b"])


def test_mismatched_inputs_are_errors():
    reward = get_reward("brevity")
    with pytest.raises(RewardError, match="2 prompts but 1 responses"):
        reward(["a", "b"], ["x"])
    with pytest.raises(RewardError, match="list of strings"):
        reward("a", "b")
    with pytest.raises(RewardError, match="must be strings"):
        reward(["a"], [None])


def test_load_failure_is_a_reward_error():
    class Broken(Reward):
        def _load(self):
            raise OSError("weights missing")

    with pytest.raises(RewardError, match=r"reward 'broken': could not be loaded.*weights missing"):
        Broken("broken")(["a"], ["b"])


def test_register_reward_decorator():
    try:

        @register_reward("test-shout")
        def shout(prompts, responses):
            return [float(r.count("!")) for r in responses]

        assert shout(["a"], ["!!"]) == [2.0]  # the decorator returns the function unchanged
        assert "test-shout" in available_rewards()
        assert get_reward("test-shout")(["a", "b"], ["hi!", "no"]) == [1.0, 0.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test-shout")(shout)

        @register_reward("test-shout", overwrite=True)
        class Shout(Reward):
            def _score(self, state, prompts, responses):
                return [10.0 * r.count("!") for r in responses]

        assert get_reward("test-shout")(["a"], ["!"]) == [10.0]
        assert get_reward("test-shout").name == "test-shout"
        for bad in ("Has Caps", "a:b", "hf-classifier", ""):
            with pytest.raises(ValueError, match="invalid reward name"):
                register_reward(bad)
    finally:
        unregister_reward("test-shout")
    assert "test-shout" not in available_rewards()


# -- hf-classifier adapter ---------------------------------------------------------------------

_WORDS = (
    "how do i bake bread knead the dough and put it in a hot oven my flight was cancelled "
    "what are options ask airline for refund or another the election results were announced"
).split()


def _word_tokenizer(*, bert_style: bool):
    """A tiny word-level fast tokenizer built offline (no vocab files from anywhere)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert_style else ["<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(_WORDS)))}
    unk = specials[1] if bert_style else "<unk>"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        ), len(vocab)
    # GPT-2 style: no pad token at all, the adapter must fall back to eos for padding
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    ), len(vocab)


@pytest.fixture(scope="module")
def tiny_classifiers(tmp_path_factory):
    """Two tiny random sequence classifiers saved as safetensors: a BERT and a GPT-2."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    root = tmp_path_factory.mktemp("tiny-rms")
    torch.manual_seed(0)
    tokenizer, vocab_size = _word_tokenizer(bert_style=True)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=3,
        )
    ).eval()
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")

    tokenizer, vocab_size = _word_tokenizer(bert_style=False)
    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, num_labels=1
        )
    ).eval()
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    for folder in ("bert", "gpt2"):
        assert (root / folder / "model.safetensors").is_file()
        assert not list((root / folder).glob("*.bin"))
    return {"bert": (root / "bert", bert), "gpt2": (root / "gpt2", gpt2)}


CLS_PROMPTS = ["How do I bake bread?", "My flight was cancelled, what are my options?", "the"]
CLS_RESPONSES = [
    "Knead the dough and put it in a hot oven.",
    "Ask the airline for a refund or another flight.",
    "the election results were announced and the results were announced",
]


def test_hf_classifier_scores_label_logits(tiny_classifiers):
    import torch
    from transformers import AutoTokenizer

    path, model = tiny_classifiers["bert"]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        expected = [
            model(**tokenizer(p, r, return_tensors="pt")).logits[0].tolist()
            for p, r in zip(CLS_PROMPTS, CLS_RESPONSES, strict=True)
        ]
    default = get_reward(f"hf-classifier:{path}")  # default: the last label
    assert not default.loaded
    assert default(CLS_PROMPTS, CLS_RESPONSES) == pytest.approx([e[2] for e in expected], abs=1e-5)
    first = get_reward(f"hf-classifier:{path}:0")
    assert first(CLS_PROMPTS, CLS_RESPONSES) == pytest.approx([e[0] for e in expected], abs=1e-5)
    middle = get_reward(f"hf-classifier:{path}:-2")
    assert middle(CLS_PROMPTS, CLS_RESPONSES) == pytest.approx([e[1] for e in expected], abs=1e-5)
    # the response matters, and so does the prompt: the pair is scored, not the response alone
    a, b = default(["How do I bake bread?"] * 2, ["Knead the dough.", "the election results"])
    assert a != pytest.approx(b)
    c, d = default(["How do I bake bread?", "the election"], ["Knead the dough."] * 2)
    assert c != pytest.approx(d)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_classifier_batch_equals_one_by_one(tiny_classifiers, kind):
    path, _ = tiny_classifiers[kind]
    reward = get_reward(f"hf-classifier:{path}")
    batched = reward(CLS_PROMPTS, CLS_RESPONSES)
    single = [reward([p], [r])[0] for p, r in zip(CLS_PROMPTS, CLS_RESPONSES, strict=True)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(batched)) == len(batched)  # a random model still tells inputs apart


def test_hf_classifier_errors(tiny_classifiers, tmp_path):
    path, _ = tiny_classifiers["bert"]
    with pytest.raises(RewardError, match=r"label index 3 out of range.*3 labels"):
        get_reward(f"hf-classifier:{path}:3")(["a"], ["b"])
    with pytest.raises(RewardSpecError, match="does not exist"):
        get_reward(f"hf-classifier:{tmp_path / 'missing'}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(RewardError, match=r"hf-classifier:.*pickled.*only safetensors"):
        get_reward(f"hf-classifier:{pickled}")(["a"], ["b"])
    # inputs longer than the model's 32 positions are truncated, not an error
    long = " ".join(["bread"] * 100)
    assert len(get_reward(f"hf-classifier:{path}")([long], [long])) == 1
