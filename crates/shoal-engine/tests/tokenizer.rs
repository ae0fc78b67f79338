//! Tests of the byte-level BPE tokenizer and the chat templates: a tiny hand-made vocabulary
//! (merge order, word boundaries, special tokens, UTF-8 round trips, streaming decode,
//! tokenizer.json), the pre-tokenizer expressions against splits made with the original
//! expressions (lookahead included), and the real SmolLM2 vocabulary against ids the Hugging Face
//! tokenizer gives.

use std::path::PathBuf;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use shoal_engine::gguf::GgufFile;
use shoal_engine::template::{self, ChatTemplate, Message, TemplateError};
use shoal_engine::tokenizer::{PreTokenizer, StreamDecoder, TokenType, Tokenizer, TokenizerError};

/// Pre-tokenizer splits computed with Python's `regex` module and the original expressions
/// (lookahead included): (text, gpt2, smollm, llama3, qwen2).
type Words = &'static [&'static str];
#[rustfmt::skip]
const SPLITS: &[(&str, Words, Words, Words, Words)] = &[
    ("Hello world", &["Hello", " world"], &["Hello", " world"], &["Hello", " world"], &["Hello", " world"]),
    ("a  b", &["a", " ", " b"], &["a", " ", " b"], &["a", " ", " b"], &["a", " ", " b"]),
    ("a   b\n\nc", &["a", "  ", " b", "\n", "\n", "c"], &["a", "  ", " b", "\n", "\n", "c"], &["a", "  ", " b", "\n\n", "c"], &["a", "  ", " b", "\n\n", "c"]),
    ("  leading", &[" ", " leading"], &[" ", " leading"], &[" ", " leading"], &[" ", " leading"]),
    ("trailing   ", &["trailing", "   "], &["trailing", "   "], &["trailing", "   "], &["trailing", "   "]),
    ("x \n  y", &["x", " \n ", " y"], &["x", " \n ", " y"], &["x", " \n", " ", " y"], &["x", " \n", " ", " y"]),
    ("tab\t\tz", &["tab", "\t", "\t", "z"], &["tab", "\t", "\t", "z"], &["tab", "\t", "\tz"], &["tab", "\t", "\tz"]),
    ("line1\r\nline2\n\n\n  indented", &["line", "1", "\r", "\n", "line", "2", "\n\n\n ", " indented"], &["line", "1", "\r", "\n", "line", "2", "\n\n\n ", " indented"], &["line", "1", "\r\n", "line", "2", "\n\n\n", " ", " indented"], &["line", "1", "\r\n", "line", "2", "\n\n\n", " ", " indented"]),
    ("I'm sure it's THEY'RE we'll you'd I'VE", &["I", "'m", " sure", " it", "'s", " THEY", "'", "RE", " we", "'ll", " you", "'d", " I", "'", "VE"], &["I", "'m", " sure", " it", "'s", " THEY", "'", "RE", " we", "'ll", " you", "'d", " I", "'", "VE"], &["I", "'m", " sure", " it", "'s", " THEY", "'RE", " we", "'ll", " you", "'d", " I", "'VE"], &["I", "'m", " sure", " it", "'s", " THEY", "'RE", " we", "'ll", " you", "'d", " I", "'VE"]),
    ("12345 67 8", &["12345", " 67", " 8"], &["1", "2", "3", "4", "5", " ", "6", "7", " ", "8"], &["123", "45", " ", "67", " ", "8"], &["1", "2", "3", "4", "5", " ", "6", "7", " ", "8"]),
    ("price: $1,234.56!!", &["price", ":", " $", "1", ",", "234", ".", "56", "!!"], &["price", ":", " $", "1", ",", "2", "3", "4", ".", "5", "6", "!!"], &["price", ":", " $", "1", ",", "234", ".", "56", "!!"], &["price", ":", " $", "1", ",", "2", "3", "4", ".", "5", "6", "!!"]),
    ("naïve café 北京 123", &["naïve", " café", " 北京", " 123"], &["naïve", " café", " 北京", " ", "1", "2", "3"], &["naïve", " café", " 北京", " ", "123"], &["naïve", " café", " 北京", " ", "1", "2", "3"]),
    ("emoji 👋🏽 ok", &["emoji", " 👋🏽", " ok"], &["emoji", " 👋🏽", " ok"], &["emoji", " 👋🏽", " ok"], &["emoji", " 👋🏽", " ok"]),
    ("a\u{a0}\u{a0}b", &["a", "\u{a0}", "\u{a0}", "b"], &["a", "\u{a0}", "\u{a0}", "b"], &["a", "\u{a0}", "\u{a0}b"], &["a", "\u{a0}", "\u{a0}b"]),
    ("foo\n \nbar", &["foo", "\n ", "\n", "bar"], &["foo", "\n ", "\n", "bar"], &["foo", "\n \n", "bar"], &["foo", "\n \n", "bar"]),
    ("  \n", &["  \n"], &["  \n"], &["  \n"], &["  \n"]),
    ("...\n\n", &["...", "\n\n"], &["...", "\n\n"], &["...\n\n"], &["...\n\n"]),
    ("x = {'a': [1, 2]}\n", &["x", " =", " {'", "a", "':", " [", "1", ",", " 2", "]}", "\n"], &["x", " =", " {'", "a", "':", " [", "1", ",", " ", "2", "]}", "\n"], &["x", " =", " {'", "a", "':", " [", "1", ",", " ", "2", "]}\n"], &["x", " =", " {'", "a", "':", " [", "1", ",", " ", "2", "]}\n"]),
    ("١٢٣ Ⅻ ½", &["١٢٣", " Ⅻ", " ½"], &["١", "٢", "٣", " ", "Ⅻ", " ", "½"], &["١٢٣", " ", "Ⅻ", " ", "½"], &["١", "٢", "٣", " ", "Ⅻ", " ", "½"]),
    (":)\n\nHi", &[":)", "\n", "\n", "Hi"], &[":)", "\n", "\n", "Hi"], &[":)\n\n", "Hi"], &[":)\n\n", "Hi"]),
    ("ǅ ǈ  Ǆ", &["ǅ", " ǈ", " ", " Ǆ"], &["ǅ", " ǈ", " ", " Ǆ"], &["ǅ", " ǈ", " ", " Ǆ"], &["ǅ", " ǈ", " ", " Ǆ"]),
];

/// SmolLM2 ids for the same texts, from a plain Python BPE over the file's vocabulary and merges
/// (which reproduces the Hugging Face ids in `HF_SMOLLM2`).
#[rustfmt::skip]
const SMOLLM2_IDS: &[(&str, &[u32])] = &[
    ("Hello world", &[19556, 905]),
    ("a  b", &[81, 216, 278]),
    ("a   b\n\nc", &[81, 256, 278, 198, 198, 83]),
    ("  leading", &[216, 2899]),
    ("trailing   ", &[4861, 4966, 333]),
    ("x \n  y", &[104, 3717, 216, 329]),
    ("tab\t\tz", &[15999, 197, 197, 106]),
    ("line1\r\nline2\n\n\n  indented", &[1311, 33, 201, 198, 1311, 34, 1116, 3805, 641, 6574]),
    ("I'm sure it's THEY'RE we'll you'd I'VE", &[57, 5248, 2090, 357, 506, 6462, 73, 23, 3256, 392, 3060, 346, 6737, 339, 23, 18525]),
    ("12345 67 8", &[33, 34, 35, 36, 37, 216, 38, 39, 216, 40]),
    ("price: $1,234.56!!", &[17517, 42, 1885, 33, 28, 34, 35, 36, 30, 37, 38, 10095]),
    ("naïve café 北京 123", &[3546, 46494, 37366, 13223, 230, 241, 16736, 122, 216, 33, 34, 35]),
    ("emoji 👋🏽 ok", &[391, 33777, 15107, 235, 229, 10813, 233, 138, 10907]),
    ("a\u{a0}\u{a0}b", &[81, 15442, 15442, 82]),
    ("foo\n \nbar", &[15236, 3805, 198, 6299]),
    ("  \n", &[32057]),
    ("...\n\n", &[2026, 1116]),
    ("x = {'a': [1, 2]}\n", &[104, 446, 7353, 81, 1539, 933, 33, 28, 216, 34, 28852, 198]),
    ("١٢٣ Ⅻ ½", &[164, 111, 164, 112, 164, 113, 216, 173, 223, 121, 216, 16738]),
    (":)\n\nHi", &[42, 25, 198, 198, 26843]),
    ("ǅ ǈ  Ǆ", &[146, 223, 216, 146, 226, 216, 216, 146, 222]),
];

// ---------------------------------------------------------------------------------------------
// A tiny hand-made vocabulary
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte characters, written out independently of the crate: printable Latin-1 bytes are
/// themselves, the other 68 bytes take U+0100.. in byte order.
fn byte_char(b: u8) -> char {
    let printable = |x: u8| (0x21..=0x7E).contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// Byte-level form of a text (`" the"` → `"Ġthe"`).
fn bl(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

/// A vocabulary of the 256 byte tokens (id = byte), then one token per merge result in merge
/// order, then `extra` tokens with their types. Merges are written in plain text and converted.
fn tiny(merges: &[(&str, &str)], extra: &[(&str, i32)], pre: &str) -> Tokenizer {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![1; 256];
    let mut rules = Vec::new();
    for (a, b) in merges {
        rules.push(format!("{} {}", bl(a), bl(b)));
        let joined = bl(&format!("{a}{b}"));
        if !tokens.contains(&joined) {
            tokens.push(joined);
            types.push(1);
        }
    }
    for (t, ty) in extra {
        tokens.push((*t).to_owned());
        types.push(*ty);
    }
    Tokenizer::from_parts(tokens, rules, types, pre, None, None).unwrap()
}

/// Ids of plain-text tokens of a tiny vocabulary.
fn ids(tok: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
    pieces.iter().map(|p| tok.token_id(&bl(p)).unwrap_or_else(|| panic!("{p:?} is not in the vocabulary"))).collect()
}

#[test]
fn merges_apply_in_rank_order() {
    let bc_first = tiny(&[("b", "c"), ("a", "b")], &[], "gpt2");
    assert_eq!(bc_first.encode("abc", false), ids(&bc_first, &["a", "bc"]));
    let ab_first = tiny(&[("a", "b"), ("b", "c")], &[], "gpt2");
    assert_eq!(ab_first.encode("abc", false), ids(&ab_first, &["ab", "c"]));
    // A merge whose parts only appear after an earlier merge.
    let chain = tiny(&[("b", "c"), ("a", "bc"), ("a", "b")], &[], "gpt2");
    assert_eq!(chain.encode("abc", false), ids(&chain, &["abc"]));
    assert_eq!(chain.encode("abab", false), ids(&chain, &["ab", "ab"]));
}

#[test]
fn equal_ranks_merge_leftmost_first() {
    let tok = tiny(&[("a", "a"), ("aa", "aa")], &[], "gpt2");
    assert_eq!(tok.encode("aaa", false), ids(&tok, &["aa", "a"]));
    assert_eq!(tok.encode("aaaa", false), ids(&tok, &["aaaa"]));
    assert_eq!(tok.encode("aaaaa", false), ids(&tok, &["aaaa", "a"]));
    assert_eq!(tok.encode("aaaaaaa", false), ids(&tok, &["aaaa", "aa", "a"]));
}

#[test]
fn whole_words_merge() {
    let merges = [
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        (" ", "w"),
        ("o", "r"),
        (" w", "or"),
        ("l", "d"),
        (" wor", "ld"),
    ];
    let tok = tiny(&merges, &[], "gpt2");
    assert_eq!(tok.encode("hello world", false), ids(&tok, &["hello", " world"]));
    assert_eq!(tok.encode("hello  world!", false), ids(&tok, &["hello", " ", " world", "!"]));
    assert_eq!(tok.decode(&tok.encode("hello  world!", false)), "hello  world!");
    assert_eq!(tok.vocab_size(), 256 + merges.len());
    assert_eq!(tok.merge_count(), merges.len());
    assert_eq!(tok.token_bytes(tok.token_id(&bl(" world")).unwrap()), b" world");
    assert_eq!(tok.token_str(tok.token_id("Ġworld").unwrap()), Some("Ġworld"));
}

#[test]
fn merges_never_cross_word_boundaries() {
    // "  b" is " " + " b" (the lookahead gives the last space to the word), so the space-space
    // merge must not apply although it has the lowest rank.
    let tok = tiny(&[(" ", " "), (" ", "b"), ("a", " ")], &[], "gpt2");
    assert_eq!(tok.encode("a  b", false), ids(&tok, &["a", " ", " b"]));
    assert_eq!(tok.encode("a   ", false), ids(&tok, &["a", "  ", " "]));
    // Digits are words of their own for SmolLM.
    let smol = tiny(&[(" ", "1"), ("1", "2")], &[], "smollm");
    assert_eq!(smol.encode("x 12", false), ids(&smol, &["x", " ", "1", "2"]));
    let gpt2 = tiny(&[(" ", "1"), ("1", "2")], &[], "gpt2");
    assert_eq!(gpt2.encode("x 12", false), ids(&gpt2, &["x", " 1", "2"]));
}

#[test]
fn llama3_takes_whole_words_from_the_vocabulary() {
    // "abc" is a token but no merge builds it: Llama 3 (ignore_merges) finds it, GPT-2 does not.
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.push("abc".into());
    let n = tokens.len();
    let llama = Tokenizer::from_parts(tokens.clone(), vec![], vec![], "llama-bpe", None, None).unwrap();
    assert_eq!(llama.encode("abc", false), vec![n as u32 - 1]);
    assert_eq!(llama.pre_tokenizer(), PreTokenizer::Llama3);
    let gpt2 = Tokenizer::from_parts(tokens, vec![], vec![], "gpt2", None, None).unwrap();
    assert_eq!(gpt2.encode("abc", false), vec![97, 98, 99]);
}

#[test]
fn pre_tokenizers_split_like_the_original_expressions() {
    let families = [("gpt2", 1), ("smollm", 2), ("llama-bpe", 3), ("qwen2", 4)];
    for (name, column) in families {
        let tok = tiny(&[], &[], name);
        for row in SPLITS {
            let expected = match column {
                1 => row.1,
                2 => row.2,
                3 => row.3,
                _ => row.4,
            };
            assert_eq!(tok.pre_tokenize(row.0), expected, "{name} on {:?}", row.0);
        }
    }
}

/// Texts for round trips: every kind of character, whitespace and line break.
const TEXTS: &[&str] = &[
    "",
    " ",
    "\n",
    "Hello, world!",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 🦀",
    "line one\nline two\r\nline three\n\n\n  indented\ttab\t\t",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "e\u{301}\u{302} combining, \u{200d} zero-width, \u{feff} BOM, \u{0} NUL, \u{7f} DEL, \u{10ffff}",
    "code: fn main() { println!(\"{}\", 1 + 2); } // ok\n    return x**2;",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 ١٢٣ ½ Ⅻ",
    "I'm, you're, it's, we'll, they'd, I've, DON'T 'quoted'",
    "   many   spaces   \u{a0}\u{a0}nbsp\u{3000}ideographic  ",
    "<|im_start|>user\nnot special here<|im_end|>",
];

#[test]
fn bytes_round_trip_for_arbitrary_utf8() {
    let merges = [(" ", "t"), ("h", "e"), (" t", "he"), ("i", "n"), (" ", " "), ("\n", "\n"), ("e", "r")];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut texts: Vec<String> = TEXTS.iter().map(|s| (*s).to_owned()).collect();
    for _ in 0..300 {
        let len = rng.random_range(0..40);
        let s: String = (0..len)
            .map(|_| match rng.random_range(0..6) {
                0 => char::from(rng.random_range(0u8..128)),
                1 => [' ', '\n', '\t', '\r', '\u{a0}', '\u{2028}'][rng.random_range(0..6)],
                2 => char::from_u32(rng.random_range(0x80..0x800)).unwrap(),
                3 => char::from_u32(rng.random_range(0x800..0xD800)).unwrap(),
                4 => char::from_u32(rng.random_range(0x1_0000..0x11_0000)).unwrap_or('\u{1F600}'),
                _ => ['\'', 's', 'l', 'e', '1', '.'][rng.random_range(0..6)],
            })
            .collect();
        texts.push(s);
    }
    for pre in ["gpt2", "smollm", "llama-bpe", "qwen2"] {
        let tok = tiny(&merges, &[], pre);
        for text in &texts {
            let ids = tok.encode(text, false);
            assert_eq!(tok.decode(&ids), *text, "{pre}: {text:?} → {ids:?}");
            let words = tok.pre_tokenize(text);
            assert_eq!(words.concat(), *text, "{pre}: pre-tokenization lost text of {text:?}");
            assert!(words.iter().all(|w| !w.is_empty()));
        }
    }
}

#[test]
fn special_tokens() {
    let extra = [("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool>", 4), ("[X]", 3), ("[X]Y", 3)];
    let tok = tiny(&[("h", "i")], &extra, "smollm");
    let id = |s: &str| tok.token_id(s).unwrap();
    let (start, end, tool, x, xy) = (id("<|im_start|>"), id("<|im_end|>"), id("<tool>"), id("[X]"), id("[X]Y"));
    assert_eq!(start, 257);
    let text = "<|im_start|>user\nhi<tool><|im_end|>\n";
    let nl = u32::from(b'\n');
    assert_eq!(
        tok.encode(text, true),
        [vec![start], ids(&tok, &["u", "s", "e", "r"]), vec![nl, id("hi"), tool, end, nl]].concat()
    );
    // Without parse_special, control tokens are plain text; user-defined ones still match.
    let plain = tok.encode(text, false);
    assert!(!plain.contains(&start) && !plain.contains(&end), "{plain:?}");
    assert!(plain.contains(&tool));
    assert_eq!(tok.decode(&plain), text);
    assert_eq!(tok.decode(&tok.encode(text, true)), text);
    // Longest match first.
    assert_eq!(tok.encode("[X]Y[X]Z", true), vec![xy, x, u32::from(b'Z')]);
    // Types and bytes.
    assert!(tok.is_special(start) && tok.is_special(tool) && !tok.is_special(id("hi")));
    assert_eq!(tok.token_type(start), Some(TokenType::Control));
    assert_eq!(tok.token_type(tool), Some(TokenType::UserDefined));
    assert_eq!(tok.token_type(100_000), None);
    assert_eq!(tok.token_bytes(end), b"<|im_end|>");
    assert!(tok.token_bytes(100_000).is_empty());
}

#[test]
fn stream_decoder_yields_whole_characters() {
    let tok = tiny(&[], &[("<|im_end|>", 3)], "gpt2");
    let text = "a👋🏽é日\n";
    let ids = tok.encode(text, true);
    assert_eq!(ids.len(), text.len()); // no merges: one token per byte
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = dec.push(&tok, id);
        assert!(text.starts_with(&(out.clone() + &piece)));
        out.push_str(&piece);
    }
    assert!(!dec.has_pending());
    assert_eq!(out, text);
    // A character cut short: held back, then U+FFFD at the end; an invalid byte: U+FFFD at once.
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push_bytes(&[b'x', 0xF0, 0x9F]), "x");
    assert!(dec.has_pending());
    assert_eq!(dec.push_bytes(&[0xFF, b'y']), "\u{FFFD}\u{FFFD}y");
    assert_eq!(dec.push_bytes(&[0xE6, 0x97]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(tok.decode(&[u32::from(b'x'), 0xF0, 0x9F, 0xFF, u32::from(b'y')]), "x\u{FFFD}\u{FFFD}y");
    // Concatenated stream output equals decode, for any cut.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let ids: Vec<u32> = (0..rng.random_range(0..12)).map(|_| rng.random_range(0..257)).collect();
        let mut dec = StreamDecoder::new();
        let mut out: String = ids.iter().map(|&id| dec.push(&tok, id)).collect();
        out.push_str(&dec.finish());
        assert_eq!(out, tok.decode(&ids), "{ids:?}");
    }
}

#[test]
fn errors_name_the_values() {
    let bytes: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let err = Tokenizer::from_parts(bytes.clone(), vec![], vec![], "klingon", None, None).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedPreTokenizer(_)));
    assert!(err.to_string().contains("klingon"), "{err}");
    let err = Tokenizer::from_parts(bytes.clone(), vec!["a b".into(), "nospace".into()], vec![], "gpt2", None, None)
        .unwrap_err();
    assert!(err.to_string().contains("merge rule 1") && err.to_string().contains("nospace"), "{err}");
    let err = Tokenizer::from_parts(bytes.clone(), vec![], vec![1; 3], "gpt2", None, None).unwrap_err();
    assert!(err.to_string().contains("256 tokens but 3"), "{err}");
    let err = Tokenizer::from_parts(bytes.clone(), vec![], vec![], "gpt2", None, Some(999)).unwrap_err();
    assert!(err.to_string().contains("999") && err.to_string().contains("256"), "{err}");
    let err = Tokenizer::from_parts(vec![], vec![], vec![], "gpt2", None, None).unwrap_err();
    assert!(matches!(err, TokenizerError::EmptyVocab));
    let err = Tokenizer::from_tokenizer_json(r#"{"model": {"type": "WordPiece"}}"#).unwrap_err();
    assert!(err.to_string().contains("WordPiece"), "{err}");
    let err = Tokenizer::from_tokenizer_json("{not json").unwrap_err();
    assert!(matches!(err, TokenizerError::Json(_)), "{err}");
    // A merge whose parts are not in the vocabulary is skipped, not an error.
    let tok = Tokenizer::from_parts(bytes, vec!["x yz".into()], vec![], "gpt2", Some(1), Some(2)).unwrap();
    assert_eq!(tok.merge_count(), 0);
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
}

#[test]
fn tokenizer_json_matches_the_gguf_form() {
    let merges = [(" ", "t"), ("h", "e"), (" t", "he"), ("1", "2"), ("12", "3")];
    let gguf_like = tiny(&merges, &[("<|eot_id|>", 3), ("<tool>", 4)], "llama-bpe");
    let vocab: serde_json::Map<String, serde_json::Value> = (0..gguf_like.vocab_size() as u32 - 2)
        .map(|id| (gguf_like.token_str(id).unwrap().to_owned(), serde_json::json!(id)))
        .collect();
    let rules: Vec<serde_json::Value> = merges
        .iter()
        .enumerate()
        .map(|(i, (a, b))| {
            // Both spellings of a merge rule: "a b" and ["a", "b"].
            if i % 2 == 0 {
                serde_json::json!(format!("{} {}", bl(a), bl(b)))
            } else {
                serde_json::json!([bl(a), bl(b)])
            }
        })
        .collect();
    let n = gguf_like.vocab_size();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": n - 2, "content": "<|eot_id|>", "special": true, "lstrip": false, "rstrip": false},
            {"id": n - 1, "content": "<tool>", "special": false, "lstrip": false, "rstrip": false},
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": rules},
    });
    let mut from_json = Tokenizer::from_tokenizer_json(&json.to_string()).unwrap();
    assert_eq!(from_json.pre_tokenizer(), PreTokenizer::Llama3);
    assert_eq!(from_json.vocab_size(), n);
    assert_eq!(from_json.merge_count(), merges.len());
    for text in ["the 12345 then<|eot_id|> <tool>x", "  the\n\nthe", "1234567"] {
        assert_eq!(from_json.encode(text, true), gguf_like.encode(text, true), "{text:?}");
        assert_eq!(from_json.encode(text, false), gguf_like.encode(text, false), "{text:?}");
    }
    assert_eq!(from_json.encode("<|eot_id|>", true), vec![n as u32 - 2]);
    assert_eq!(from_json.bos(), None);
    from_json.set_eos(Some(n as u32 - 2));
    assert_eq!(from_json.eos(), Some(n as u32 - 2));
    // A Hugging Face directory's BOS and EOS: tokenizer_config.json by text (plain or as an
    // object), then config.json by id for what it leaves unsaid; names not in the vocabulary
    // and ids past it are left unset.
    let mut hf = Tokenizer::from_tokenizer_json(&json.to_string()).unwrap();
    let tc = serde_json::json!({"bos_token": {"content": "<tool>"}, "eos_token": "<|eot_id|>", "add_bos_token": true});
    hf.apply_hf_config(Some(&tc), Some(&serde_json::json!({"bos_token_id": 1, "eos_token_id": 2})));
    assert_eq!((hf.bos(), hf.eos(), hf.add_bos()), (Some(n as u32 - 1), Some(n as u32 - 2), true));
    let mut by_id = Tokenizer::from_tokenizer_json(&json.to_string()).unwrap();
    by_id.apply_hf_config(None, Some(&serde_json::json!({"bos_token_id": 3, "eos_token_id": [5, 6]})));
    assert_eq!((by_id.bos(), by_id.eos(), by_id.add_bos()), (Some(3), Some(5), false));
    let mut bad = Tokenizer::from_tokenizer_json(&json.to_string()).unwrap();
    let tc = serde_json::json!({"bos_token": "<nope>", "add_bos_token": true});
    bad.apply_hf_config(Some(&tc), Some(&serde_json::json!({"eos_token_id": u64::MAX})));
    assert_eq!((bad.bos(), bad.eos(), bad.add_bos()), (None, None, false));

    // The SmolLM form: Digits then ByteLevel.
    let mut smol = json.clone();
    smol["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
    ]});
    let smol = Tokenizer::from_tokenizer_json(&smol.to_string()).unwrap();
    assert_eq!(smol.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!(smol.encode("x 123", false), ids(&smol, &["x", " ", "1", "2", "3"]));
    // An unknown split expression is refused.
    let mut other = json;
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = serde_json::json!("\\w+");
    let err = Tokenizer::from_tokenizer_json(&other.to_string()).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedPreTokenizer(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// SmolLM2-135M-Instruct's `tokenizer.chat_template`, as its GGUF file holds it.
const SMOLLM2_JINJA: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta Llama 3 Instruct's template.
const LLAMA3_JINJA: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// A plain ChatML template with no default system message (and `\n` written as an escape).
const CHATML_JINJA: &str = r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn templates_are_detected() {
    assert_eq!(template::detect(SMOLLM2_JINJA), Some(ChatTemplate::smollm2()));
    assert_eq!(template::detect(LLAMA3_JINJA), Some(ChatTemplate::Llama3));
    assert_eq!(template::detect(CHATML_JINJA), Some(ChatTemplate::chat_ml()));
    assert_eq!(template::detect(&SMOLLM2_JINJA.replace('\n', "\\n")), Some(ChatTemplate::smollm2()));
    assert_eq!(template::detect("{{ messages }}"), None);
    assert_eq!(ChatTemplate::smollm2().stop_tokens(), ["<|im_end|>"]);
    assert_eq!(ChatTemplate::Llama3.stop_tokens(), ["<|eot_id|>"]);
}

#[test]
fn chatml_renders_like_the_smollm2_template() {
    let t = template::detect(SMOLLM2_JINJA).unwrap();
    let user = [Message::new("user", "What is the capital of France?")];
    assert_eq!(
        t.render(&user, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", " spaces kept \n"),
    ];
    assert_eq!(
        t.render(&with_system, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n spaces kept \n<|im_end|>\n"
    );
    assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>assistant\n");
    assert_eq!(
        ChatTemplate::chat_ml().render(&user, false).unwrap(),
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    );
}

#[test]
fn llama3_renders_like_its_template() {
    let msgs = [Message::new("system", "Be brief. "), Message::new("user", "\nHi there\n")];
    assert_eq!(
        ChatTemplate::Llama3.render(&msgs, true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 vocabulary
// ---------------------------------------------------------------------------------------------

fn smollm2() -> Option<(Tokenizer, GgufFile)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!("skipping: run scripts/fetch-model.sh");
        return None;
    }
    let file = GgufFile::open(&path).expect("open the SmolLM2 GGUF file");
    let tok = Tokenizer::from_gguf(&file).expect("read the SmolLM2 tokenizer");
    Some((tok, file))
}

/// Ids the Hugging Face SmolLM2 tokenizer gives (as published with other implementations).
const HF_SMOLLM2: &[(&str, &[u32])] = &[
    ("Hello, we can use", &[19556, 28, 392, 416, 722]),
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        &[2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182],
    ),
    ("\n", &[198]),
    ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
    ("Café déjà vu.", &[51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
    ("  multiple   spaces", &[216, 2701, 256, 5600]),
    ("What is the capital of France?", &[1780, 314, 260, 3575, 282, 4649, 47]),
    ("The capital of France is Paris.<|im_end|>", &[504, 3575, 282, 4649, 314, 7042, 30, 2]),
];

/// The ChatML prompt for "What is the capital of France?" with SmolLM2's default system
/// message, as the Hugging Face tokenizer and chat template give it.
const HF_SMOLLM2_PROMPT: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198,
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

#[test]
fn smollm2_metadata() {
    let Some((tok, _)) = smollm2() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!((tok.bos(), tok.eos(), tok.unk()), (Some(1), Some(2), Some(0)));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(tok.is_special(1) && tok.is_special(2) && !tok.is_special(4649));
    assert_eq!(tok.encode("<|im_start|>", true), vec![1]);
    assert_eq!(tok.encode("<|im_end|>", true), vec![2]);
    assert!(tok.encode("<|im_end|>", false).len() > 1);
    for word in [" France", " capital", " the", " Paris", "Hello"] {
        assert_eq!(tok.encode(word, false).len(), 1, "{word:?} should be one token");
    }
    assert_eq!(tok.token_bytes(4649), b" France");
    assert_eq!(tok.decode(&[504, 3575, 282, 4649, 314, 7042, 30]), "The capital of France is Paris.");
}

#[test]
fn smollm2_matches_hugging_face_ids() {
    let Some((tok, _)) = smollm2() else { return };
    for (text, expected) in HF_SMOLLM2 {
        assert_eq!(tok.encode(text, true), *expected, "{text:?}");
        assert_eq!(tok.decode(expected), *text);
    }
    for (text, expected) in SMOLLM2_IDS {
        assert_eq!(tok.encode(text, true), *expected, "{text:?}");
    }
}

#[test]
fn smollm2_chat_prompt_matches_hugging_face() {
    let Some((tok, file)) = smollm2() else { return };
    let jinja = file.get("tokenizer.chat_template").and_then(|v| v.as_str()).expect("the file has a chat template");
    assert_eq!(jinja, SMOLLM2_JINJA);
    let t = template::detect(jinja).expect("ChatML");
    assert_eq!(t, ChatTemplate::smollm2());
    let prompt = t.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    assert_eq!(tok.encode(&prompt, true), HF_SMOLLM2_PROMPT);
    let stop = t.stop_tokens().iter().map(|s| tok.token_id(s).unwrap()).collect::<Vec<_>>();
    assert_eq!(stop, [2]);
}

#[test]
fn smollm2_round_trips() {
    let Some((tok, _)) = smollm2() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut texts: Vec<String> = TEXTS.iter().chain(SPLITS.iter().map(|r| &r.0)).map(|s| (*s).to_owned()).collect();
    for _ in 0..500 {
        let len = rng.random_range(0..60);
        texts.push(
            (0..len)
                .map(|_| match rng.random_range(0..5) {
                    0 | 1 => char::from(rng.random_range(0x20u8..0x7F)),
                    2 => [' ', '\n', '\t', '\r'][rng.random_range(0..4)],
                    3 => char::from_u32(rng.random_range(0xA0..0x3000)).unwrap_or('é'),
                    _ => char::from_u32(rng.random_range(0x1F300..0x1FAFF)).unwrap_or('🦀'),
                })
                .collect(),
        );
    }
    for text in &texts {
        let ids = tok.encode(text, false);
        assert_eq!(tok.decode(&ids), *text, "{ids:?}");
        let mut dec = StreamDecoder::new();
        let mut streamed: String = ids.iter().map(|&id| dec.push(&tok, id)).collect();
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, *text);
    }
}

#[test]
fn smollm2_encodes_quickly() {
    let Some((tok, _)) = smollm2() else { return };
    let mut text = String::new();
    while text.len() < 1 << 20 {
        for t in TEXTS {
            text.push_str(t);
            text.push(' ');
        }
        text.push_str(&format!("The capital of France is Paris, number {}. ", text.len()));
    }
    let start = Instant::now();
    let ids = tok.encode(&text, false);
    let took = start.elapsed();
    println!(
        "encoded {} bytes into {} tokens in {took:?} ({:.1} MB/s)",
        text.len(),
        ids.len(),
        text.len() as f64 / took.as_secs_f64() / 1e6
    );
    assert_eq!(tok.decode(&ids), text);
    // A long run of one character: the heap keeps BPE well below quadratic time.
    let spaces = " ".repeat(100_000) + "x";
    let start = Instant::now();
    let ids = tok.encode(&spaces, false);
    println!("100000 spaces: {} tokens in {:?}", ids.len(), start.elapsed());
    assert_eq!(tok.decode(&ids), spaces);
}

/// Gemma's chat template as its GGUF files carry it (no ChatML, no Llama 3).
const GEMMA_JINJA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

#[test]
fn a_models_own_jinja_template_is_rendered_and_its_errors_are_errors() {
    let from = |src: &str| ChatTemplate::from_file(Some(src), "<bos>", "<eos>");
    // The families shoal renders itself stay as they were; a file with none says so.
    assert_eq!(from(SMOLLM2_JINJA), Ok(Some(ChatTemplate::smollm2())));
    assert_eq!(ChatTemplate::from_file(None, "", ""), Ok(None));

    let gemma = from(GEMMA_JINJA).unwrap().expect("a template");
    assert!(matches!(gemma, ChatTemplate::Jinja(_)), "{gemma:?}");
    let turn = [Message::new("user", "  Hi there "), Message::new("assistant", "Hello!"), Message::new("user", "Bye")];
    assert_eq!(
        gemma.render(&turn, true).unwrap(),
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(gemma.stop_tokens(), ["<end_of_turn>"]);
    // The template's own errors come back as errors, with its words.
    let e = gemma.render(&[Message::new("system", "be brief"), Message::new("user", "Hi")], true).unwrap_err();
    assert!(matches!(&e, TemplateError::Render(m) if m.contains("System role not supported")), "{e}");
    let e = gemma.render(&[Message::new("assistant", "x")], true).unwrap_err();
    assert!(e.to_string().contains("must alternate"), "{e}");

    // Python's string methods, as Hugging Face templates use them.
    let py = from("{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}{% endfor %}")
        .unwrap()
        .unwrap();
    assert_eq!(py.render(&[Message::new("user", " hi ")], false).unwrap(), "HI|True");

    // Hostile templates: refused when the model loads, or bounded when rendered.
    assert!(matches!(from("{% for m in messages %}{{ m.content "), Err(TemplateError::Syntax(_))));
    assert!(matches!(from(&"x".repeat(template::MAX_TEMPLATE_BYTES + 1)), Err(TemplateError::TooLarge(_))));
    let spin = from("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}").unwrap().unwrap();
    assert!(matches!(spin.render(&turn, true), Err(TemplateError::Render(_))), "fuel bounds the work");
    let bomb = from("{% for i in range(50000) %}{{ messages[0].content }}{% endfor %}").unwrap().unwrap();
    let big = [Message::new("user", "y".repeat(1024))];
    let e = bomb.render(&big, true).unwrap_err();
    assert!(e.to_string().contains("bytes"), "the output is bounded: {e}");
    let unknown = from("{{ strftime_now('%Y') }}").unwrap().unwrap();
    assert!(matches!(unknown.render(&turn, true), Err(TemplateError::Render(_))));
}
