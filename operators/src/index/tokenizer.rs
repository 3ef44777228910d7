//! The index's text analysis: [`super::TOKENIZER`] splits words for alphabetic scripts
//! and CJK text into characters, then lower-cases and stems.

use tantivy::Index;
use tantivy::tokenizer::{
    LowerCaser, RemoveLongFilter, Stemmer, TextAnalyzer, Token, TokenStream, Tokenizer,
};

use super::TOKENIZER;

pub(super) fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(CjkWordTokenizer)
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(Stemmer::default())
        .build()
}

pub(super) fn register_tokenizer(index: &Index) {
    index.tokenizers().register(TOKENIZER, analyzer());
}

/// Words (runs of letters and digits) for alphabetic scripts, one token per character for
/// Chinese, Japanese and Korean, where words are not separated by spaces: a character
/// index finds every word without a dictionary, and BM25 still rewards texts that share
/// more of the query's characters.
#[derive(Clone, Copy, Debug, Default)]
struct CjkWordTokenizer;

/// The tokens of one text.
struct CjkTokenStream {
    tokens: Vec<Token>,
    next: usize,
}

impl Tokenizer for CjkWordTokenizer {
    type TokenStream<'a> = CjkTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> CjkTokenStream {
        let mut tokens = Vec::new();
        let mut word_start: Option<usize> = None;
        let push = |tokens: &mut Vec<Token>, from: usize, to: usize| {
            let position = tokens.len();
            tokens.push(Token {
                offset_from: from,
                offset_to: to,
                position,
                text: text[from..to].to_string(),
                position_length: 1,
            });
        };
        for (at, c) in text.char_indices() {
            let cjk = is_cjk(c);
            if !c.is_alphanumeric() || cjk {
                if let Some(start) = word_start.take() {
                    push(&mut tokens, start, at);
                }
                if cjk {
                    push(&mut tokens, at, at + c.len_utf8());
                }
            } else if word_start.is_none() {
                word_start = Some(at);
            }
        }
        if let Some(start) = word_start {
            push(&mut tokens, start, text.len());
        }
        CjkTokenStream { tokens, next: 0 }
    }
}

impl TokenStream for CjkTokenStream {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

/// Han ideographs, kana and Hangul syllables.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK Extension A
        | 0x4E00..=0x9FFF    // CJK Unified Ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK Compatibility Ideographs
        | 0x20000..=0x2FA1F  // Extensions B–F, compatibility supplement
    )
}
