#!/usr/bin/env python3
"""Write the text fixtures (tokenizer ids, decode round trips, chat template renders) from the
Hugging Face `transformers` reference implementation.

    /tmp/oracle/bin/python tools/make_text_fixtures.py --tokenizer models/gemma-3-270m

Outputs (relative to the repository root):
    tests/fixtures/tokenizer_cases.json
    tests/fixtures/chat_cases.json
"""

import argparse
import json
import os
import sys

from transformers import AutoTokenizer

# Strings chosen to exercise the normalizer (space -> U+2581), the byte fallback, added/special
# tokens, and multi-codepoint graphemes.
TOKENIZER_STRINGS = [
    ("ascii", "Hello, world!"),
    ("empty", ""),
    ("single_space", " "),
    ("space_runs", "a  b   c    d     e"),
    ("leading_trailing_spaces", "   padded text   "),
    ("tabs_newlines", "line1\nline2\r\n\tindented\n\n\nend\t\t"),
    ("digits", "3.14159 2026-01-31 1234567890 0x1F"),
    ("accents", "Café naïve résumé Ångström façade"),
    ("combining_accents", "Cafe\u0301 nai\u0308ve"),
    ("cjk", "日本語のテキストと中文文本, 한국어 텍스트"),
    ("emoji", "I ❤️ Rust 🦀🚀 🫠"),
    ("emoji_zwj", "family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 astronaut 🧑🏽\u200d🚀"),
    ("byte_fallback", "hieroglyphs 𓀀𓀁 ꙮ \U0001FAE8 \U00010F00"),
    ("code", "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n"),
    ("control_tokens", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"),
    ("bos_in_text", "<bos>hello <bos> again"),
    ("special_like_text", "<start_of_turn> <end_of_turn><eos><pad>"),
    ("control_chars", "nul\x00bel\x07 rtl\u202eltr"),
    ("mixed_long", "The quick brown fox — «jumps» over 13 lazy dogs; ¿por qué? Ça va. Доброе утро! مرحبا"),
]

CHAT_CASES = [
    ("single_user", [{"role": "user", "content": "Hello!"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2+2?"},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Good morning"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Thanks"},
        ],
    ),
    (
        "whitespace_trim",
        [
            {"role": "user", "content": "  \n\tpadded question \n\n "},
            {"role": "assistant", "content": "\n answer with spaces  "},
            {"role": "user", "content": "\tnext\t"},
        ],
    ),
    ("unicode_content", [{"role": "user", "content": "日本語で答えて 🦀 👨\u200d👩\u200d👧"}]),
    (
        "non_alternating",
        [
            {"role": "user", "content": "one"},
            {"role": "user", "content": "two"},
        ],
    ),
    (
        "assistant_first",
        [
            {"role": "assistant", "content": "I speak first"},
        ],
    ),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--out", default=None, help="fixtures directory (default: <repo>/tests/fixtures)")
    args = ap.parse_args()

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = args.out or os.path.join(repo, "tests", "fixtures")
    os.makedirs(out, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(args.tokenizer)

    cases = []
    for name, text in TOKENIZER_STRINGS:
        ids_bos = tok(text, add_special_tokens=True)["input_ids"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "ids_with_bos": ids_bos,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
                "decoded_with_bos": tok.decode(ids_bos, skip_special_tokens=False),
            }
        )
    tok_doc = {
        "generator": "tools/make_text_fixtures.py (transformers AutoTokenizer)",
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }

    chat = []
    for name, messages in CHAT_CASES:
        for add_gen in (False, True):
            entry = {"name": f"{name}{'_gen' if add_gen else ''}", "messages": messages, "add_generation_prompt": add_gen}
            try:
                rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
                entry["error"] = False
                entry["rendered"] = rendered
                entry["ids"] = tok(rendered, add_special_tokens=False)["input_ids"]
            except Exception as e:  # the template's raise_exception
                entry["error"] = True
                entry["error_message"] = str(e)
            chat.append(entry)
    chat_doc = {
        "generator": "tools/make_text_fixtures.py (transformers apply_chat_template)",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "cases": chat,
    }

    for fname, doc in (("tokenizer_cases.json", tok_doc), ("chat_cases.json", chat_doc)):
        path = os.path.join(out, fname)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {path} ({len(doc['cases'])} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
