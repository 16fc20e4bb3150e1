"""The generate loop: streaming, stop strings, cache reuse, context shift, options."""

from __future__ import annotations

import pytest

import edgeslm
from edgeslm.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from edgeslm.generation import TextStream


@pytest.fixture
def model(tiny_package):
    return edgeslm.load(tiny_package, n_threads=1)


def test_stream_yields_the_same_text_as_a_whole_generation(model):
    whole = model.generate("Hello there", max_tokens=24, ignore_eos=True)
    model.reset()
    pieces = list(
        model.generate("Hello there", stream=True, max_tokens=24, ignore_eos=True)
    )
    assert "".join(pieces) == whole.text
    assert len(whole.tokens) == 24
    assert whole.finish_reason == "length"


def test_stop_string_cuts_the_text_and_ends_the_generation(model):
    whole = model.generate("Hello there", max_tokens=24, ignore_eos=True)
    text = whole.text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = model.generate("Hello there", max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_text_stream_holds_back_a_possible_stop_string():
    class Pieces:
        def __init__(self, pieces):
            self.pieces = iter(pieces)

        def add(self, _):
            return next(self.pieces)

        def flush(self):
            return ""

    stream = TextStream(Pieces(["ab", "c<", "/s", "x"]), stop=["</s>"])
    assert stream.add(0) == "ab"
    assert stream.add(0) == "c"  # "<" may start "</s>"
    assert stream.add(0) == ""  # "</s" still may
    assert stream.add(0) == "</sx"  # it did not
    assert stream.finish() == ""
    assert not stream.stopped


def test_seeded_sampling_is_reproducible(model):
    options = dict(max_tokens=16, ignore_eos=True, temperature=1.0, top_p=0.9)
    a = model.generate("Once", seed=7, **options).tokens
    b = model.generate("Once", seed=7, **options).tokens
    c = model.generate("Once", seed=8, **options).tokens
    assert a == b
    assert a != c


def test_second_chat_turn_reuses_the_cache_and_matches_a_fresh_run(model, tiny_package):
    turn1 = [{"role": "user", "content": "Hi, who are you?"}]
    first = model.chat(turn1, max_tokens=8, ignore_eos=True)
    turn2 = turn1 + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Tell me more."},
    ]
    second = model.chat(turn2, max_tokens=8, ignore_eos=True)
    assert second.stats.reused_tokens > first.stats.prompt_tokens // 2

    fresh = edgeslm.load(tiny_package, n_threads=1).chat(
        turn2, max_tokens=8, ignore_eos=True
    )
    assert second.stats.reused_tokens < fresh.stats.prompt_tokens
    assert fresh.stats.reused_tokens == 0
    assert second.tokens == fresh.tokens


def test_a_generation_longer_than_the_context_keeps_going(tiny_package):
    model = edgeslm.load(tiny_package, n_threads=1, n_ctx=48)
    out = model.generate("A long story:", max_tokens=200, ignore_eos=True)
    assert len(out.tokens) == 200
    assert model.cache.length <= 48


def test_max_tokens_zero_generates_nothing(model):
    out = model.generate("Hi", max_tokens=0)
    assert out.tokens == [] and out.text == ""


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(nucleus=0.9), "unknown generation option"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_options_name_the_problem(model, options, needle):
    with pytest.raises(ValueError, match=needle):
        model.generate("Hi", **options)


def test_bad_prompts_name_the_problem(model):
    with pytest.raises(ValueError, match="token ids must be in"):
        model.generate([1, 10**9])
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="context holds"):
        model.generate(list(range(3, 3 + model.n_ctx)))


def test_chatml_fallback_renders_like_transformers():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Lights on"},
    ]
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    expected = hf.apply_chat_template(
        messages,
        chat_template=CHATML_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ChatTemplate(None).render(messages) == expected


def test_chat_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="role"):
        ChatTemplate(None).render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="list"):
        ChatTemplate(None).render("hello")
    raising = "{{ raise_exception('no system messages') }}"
    with pytest.raises(ChatTemplateError, match="no system messages"):
        ChatTemplate(raising).render([{"role": "user", "content": "x"}])


def test_a_template_that_does_not_compile_fails_chat_not_load(tiny_package, tmp_path):
    """The template is compiled at the first chat (plain generation never loads
    jinja2); a broken one then says so, and generate() still works."""
    import json
    import shutil

    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    manifest = json.loads((package / "edgeslm.json").read_text())
    manifest["chat_template"] = "{% for m in messages %}{{ m.content }"
    (package / "edgeslm.json").write_text(json.dumps(manifest))
    model = edgeslm.load(package, n_threads=1)
    assert len(model.generate("hello", max_tokens=3, ignore_eos=True).tokens) == 3
    with pytest.raises(ChatTemplateError, match="does not compile"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=3)


def test_loading_hands_freed_heap_back_on_glibc():
    # Loading frees its temporaries (tokenizer.json's parse above all); on glibc,
    # malloc_trim returns them to the system, elsewhere there is nothing to call.
    import platform

    from edgeslm import session

    trim = session._find_malloc_trim()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert callable(trim)
        session.release_freed_heap()
    else:
        assert trim is False
