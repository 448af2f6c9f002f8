"""Chat (SFT) rendering: assistant-only loss masks from prefix rendering, built-in and tokenizer
templates, bad records, and the generated chat set of scripts/make_chat_data.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from framework.data.chat import (
    CHATML,
    chat_pieces,
    encode_chat,
    encode_chats,
    load_chat_template,
)
from framework.data.tokenizers import ByteTokenizer, load_tokenizer
from framework.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The tokenizer's own template: ChatML without the newline after <|im_end|> (unlike the built-in).
OWN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "reverse: cat"},
    {"role": "assistant", "content": "tac"},
]
END = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "plain": "\n"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer.json with ChatML special tokens, and a
    tokenizer_config.json naming its EOS and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["You answer briefly. add 2 and 3, reverse: cat tac, user assistant system"] * 8
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": OWN}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf(hf_dir):
    return load_tokenizer(str(hf_dir / "tokenizer.json"))


def _decode(tokenizer, ids) -> str:
    """Text of ids with special tokens kept (HFTokenizer.decode drops them)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    import tokenizers

    return tokenizers.Tokenizer.from_file(tokenizer.name).decode(
        [int(i) for i in ids], skip_special_tokens=False
    )


def _runs(tokenizer, ids, mask, value: int) -> list[str]:
    """Decoded texts of the maximal runs of tokens whose mask equals `value`."""
    out, start = [], None
    for k in range(len(mask) + 1):
        inside = k < len(mask) and mask[k] == value
        if inside and start is None:
            start = k
        elif not inside and start is not None:
            out.append(_decode(tokenizer, ids[start:k]))
            start = None
    return out


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain"])
def test_byte_masks_are_exactly_the_assistant_turns(name):
    tok = ByteTokenizer()
    template = load_chat_template(tok, name)
    ids, mask = encode_chat(CHAT, tok, template)
    assert ids.dtype == np.uint16 and mask.dtype == np.uint8 and ids.shape == mask.shape
    assert tok.decode(ids) == template.render(CHAT)
    assert _runs(tok, ids, mask, 1) == ["5" + END[name], "tac" + END[name]]
    unmasked = "".join(_runs(tok, ids, mask, 0))
    for m in CHAT[:2] + CHAT[3:4]:
        assert m["content"] in unmasked
    assert "assistant" in unmasked or "Assistant" in unmasked  # the header is context only


def test_hf_tokenizer_multi_turn_masks(hf):
    template = load_chat_template(hf, "chatml")
    ids, mask = encode_chat(CHAT, hf, template)
    assert _decode(hf, ids) == template.render(CHAT)
    assert _runs(hf, ids, mask, 1) == ["5<|im_end|>\n", "tac<|im_end|>\n"]
    im_end = hf.encode_special("<|im_end|>")
    assert len(im_end) == 1  # parsed as the special token, not its characters
    assert int(np.sum(ids == im_end[0])) == len(CHAT)
    unmasked = _runs(hf, ids, mask, 0)
    assert unmasked[0].endswith("<|im_start|>assistant\n")
    assert "You answer briefly." in unmasked[0] and "reverse: cat" in unmasked[1]


def test_auto_picks_the_tokenizers_own_template(hf, hf_dir):
    template = load_chat_template(hf, "auto")
    assert str(hf_dir) in template.name and template.source == OWN
    assert template.variables["eos_token"] == "<|endoftext|>"
    ids, mask = encode_chat(CHAT, hf, template)
    assert _runs(hf, ids, mask, 1) == ["5<|im_end|>", "tac<|im_end|>"]
    assert load_chat_template(hf, None).source == OWN
    # without a template of its own, "auto" is the built-in ChatML
    assert load_chat_template(ByteTokenizer(), "auto").source == CHATML


def test_template_file_beside_the_tokenizer_and_special_token_variables(tmp_path, hf_dir):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    template = load_chat_template(tok, "auto")
    assert template.name.endswith("chat_template.jinja")
    ids, mask = encode_chat(CHAT[1:3], tok, template)
    assert _runs(tok, ids, mask, 1) == ["5<|im_end|>"]
    assert _decode(tok, ids) == "user: add 2 and 3<|im_end|>assistant: 5<|im_end|>"


def test_encode_chats_appends_eos_per_conversation(hf):
    template = load_chat_template(hf, "chatml")
    ends_with_user = CHAT[:3] + [{"role": "user", "content": "thanks"}]
    records = [{"messages": CHAT}, {"messages": ends_with_user}]
    ids, mask = encode_chats(records, hf, template)
    one = encode_chat(CHAT, hf, template)
    two = encode_chat(ends_with_user, hf, template)
    n1, n2 = len(one[0]), len(two[0])
    assert len(ids) == len(mask) == n1 + n2 + 2
    assert list(np.flatnonzero(ids == hf.eos_id)) == [n1, n1 + 1 + n2]
    np.testing.assert_array_equal(ids[:n1], one[0])
    np.testing.assert_array_equal(mask[:n1], one[1])
    np.testing.assert_array_equal(ids[n1 + 1 : -1], two[0])
    np.testing.assert_array_equal(mask[n1 + 1 : -1], two[1])
    assert mask[n1] == 1 and mask[-1] == 0  # EOS is learned only after an assistant turn
    assert _runs(hf, two[0], two[1], 0)[-1].endswith("thanks<|im_end|>\n")
    empty_ids, empty_mask = encode_chats([], hf, template)
    assert empty_ids.shape == empty_mask.shape == (0,)


def test_eos_inside_a_conversation_is_refused(tmp_path, hf_dir):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    # Qwen-style: the end-of-turn token <|im_end|> is also the tokenizer's EOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="record 0: .*EOS token .*data.eos_token"):
        encode_chats([GOOD], tok, load_chat_template(tok, "chatml"))
    fixed = load_tokenizer(str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    assert len(encode_chats([GOOD], fixed, load_chat_template(fixed, "chatml"))[0]) > 0
    forged = {"messages": [{"role": "user", "content": "a<|endoftext|>b"}, CHAT[2]]}
    with pytest.raises(DataError, match="record 1: .*EOS token"):
        encode_chats([GOOD, forged], fixed, load_chat_template(fixed, "chatml"))


def test_byte_stream_eos_is_256():
    tok = ByteTokenizer()
    ids, mask = encode_chats([{"messages": CHAT}] * 3, tok, load_chat_template(tok, "plain"))
    assert list(np.flatnonzero(ids == 256)) == [
        k * len(ids) // 3 + len(ids) // 3 - 1 for k in range(3)
    ]
    assert int(mask.sum()) == 3 * (len("5\ntac\n") + 1)


GOOD = {"messages": CHAT[1:3]}


@pytest.mark.parametrize(
    "record, words",
    [
        ("text", "'messages'"),
        ({"text": "hi"}, "'messages'"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": ["hi"]}, "message 0 is not an object"),
        ({"messages": [{"content": "hi"}]}, "message 0 has no 'role'"),
        ({"messages": [{"role": "user"}]}, "message 0 has no 'content'"),
        ({"messages": [{"role": "user", "content": None}]}, "non-string 'content'"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": []}, "no assistant turn"),
    ],
)
def test_bad_records_name_the_record(record, words):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="record 1") as e:
        encode_chats([GOOD, record, GOOD], tok, load_chat_template(tok, "chatml"), where="c.jsonl")
    assert words in str(e.value) and str(e.value).startswith("c.jsonl: record 1")


def test_non_prefix_stable_template_is_refused(tmp_path):
    path = tmp_path / "counting.jinja"
    # the first line counts the messages, so a longer conversation rewrites the start
    path.write_text(
        "{{ messages | length }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    tok = ByteTokenizer()
    template = load_chat_template(tok, str(path))
    with pytest.raises(DataError, match="not prefix-stable") as e:
        encode_chats([GOOD, {"messages": CHAT}], tok, template)
    assert str(path) in str(e.value) and "record 0" in str(e.value)
    assert "message 1" in str(e.value)


def test_template_errors_are_one_line_data_errors(tmp_path):
    tok = ByteTokenizer()
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System messages are not supported') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(DataError, match="record 1.*System messages are not supported"):
        encode_chats([GOOD, {"messages": CHAT}], tok, load_chat_template(tok, str(strict)))
    mutating = tmp_path / "mutating.jinja"  # the sandbox refuses changes to the messages
    mutating.write_text("{{ messages.append(messages[0]) }}{{ messages | length }}")
    with pytest.raises(DataError, match="record 0"):
        encode_chats([GOOD], tok, load_chat_template(tok, str(mutating)))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(DataError, match="not valid jinja"):
        load_chat_template(tok, str(broken))
    with pytest.raises(DataError, match="chatml, llama3, plain"):
        load_chat_template(tok, "vicuna")


def test_generation_tags_are_accepted(tmp_path):
    tagged = CHATML.replace(
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n' }}",
        "{{ '<|im_start|>' + message['role'] + '\\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}",
    )
    assert tagged != CHATML
    path = tmp_path / "tagged.jinja"
    path.write_text(tagged)
    tok = ByteTokenizer()
    template = load_chat_template(tok, str(path))
    assert chat_pieces(CHAT, template) == chat_pieces(CHAT, load_chat_template(tok, "chatml"))


def test_rendering_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tok = load_tokenizer(str(hf_dir / "tokenizer.json"))
    for name in ("chatml", "llama3", "plain"):
        template = load_chat_template(tok, name)
        template.variables["bos_token"] = "<|im_start|>"
        for messages in (CHAT, CHAT[:4], [CHAT[1]]):
            for prompt in (False, True):
                ours = template.render(messages, add_generation_prompt=prompt)
                theirs = fast.apply_chat_template(
                    messages,
                    chat_template=template.source,
                    tokenize=False,
                    add_generation_prompt=prompt,
                )
                assert ours == theirs, (name, len(messages), prompt)


def _make_chat_data():
    spec = importlib.util.spec_from_file_location(
        "make_chat_data", ROOT / "scripts/make_chat_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_chat_data_is_deterministic_and_correct(tmp_path, capsys):
    script = _make_chat_data()
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert script.main([str(a), "--n", "300", "--seed", "3"]) == 0
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "300 conversations" in summary
    assert script.main([str(b), "--n", "300", "--seed", "3"]) == 0
    assert script.main([str(c), "--n", "300", "--seed", "4"]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(records) == 300
    kinds = set()
    for r in records:
        ms = r["messages"]
        turns = ms[1:] if ms[0]["role"] == "system" else ms
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        for q, ans in zip(turns[::2], turns[1::2], strict=True):
            question, answer = q["content"], ans["content"]
            words = question.rstrip(".?").split()
            if "add" in question or "+" in question:
                kinds.add("add")
                assert int(answer) == int(words[-3]) + int(words[-1])
            elif "everse" in question:
                kinds.add("reverse")
                assert answer == words[-1][::-1]
            else:
                kinds.add("upper")
                word = words[-1] if "uppercase" in question else words[1]
                assert answer == word.upper()
    assert kinds == {"add", "reverse", "upper"}
    assert any(r["messages"][0]["role"] == "system" for r in records)
    assert any(len(r["messages"]) >= 4 for r in records)
    tok = ByteTokenizer()
    ids, mask = encode_chats(records, tok, load_chat_template(tok, "plain"), where=str(a))
    assert int(np.sum(ids == 256)) == 300 and 0 < mask.mean() < 0.5


def test_make_chat_data_errors_are_one_line(tmp_path, capsys):
    script = _make_chat_data()
    (tmp_path / "file").write_text("")
    assert script.main([str(tmp_path / "file" / "x.jsonl")]) == 2  # the folder is a file
    assert script.main([str(tmp_path / "new" / "y.jsonl"), "--n", "3"]) == 0  # made
    assert (tmp_path / "new" / "y.jsonl").is_file()
    assert script.main([str(tmp_path / "x.jsonl"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("make_chat_data.py: error:") for line in err)
    assert not (tmp_path / "x.jsonl").exists()
