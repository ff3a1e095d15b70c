//! The lexer: SQL text to tokens (literals, quoted identifiers and comments skipped as the
//! server reads them), and the byte classes the fast path shares.

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tok<'a> {
    /// An unquoted identifier or keyword.
    Word(&'a [u8]),
    /// A quoted identifier's raw content.
    Quoted(&'a [u8]),
    /// A Unicode-escaped quoted identifier's raw content (`U&"..."`), escapes undecoded, and
    /// its escape character (`\\`, or the one a `UESCAPE` clause names).
    UQuoted(&'a [u8], u8),
    /// A string literal's raw content.
    Str(&'a [u8]),
    LParen,
    RParen,
    Comma,
    Dot,
    Semi,
    /// A dollar-quoted string's body.
    Dollar(&'a [u8]),
    /// Numbers, operators, parameters.
    Other,
    /// Nothing yet.
    None,
}

pub(super) struct Lexer<'a> {
    pub(super) s: &'a [u8],
    /// The same text as `s`, for searches that need a `str` (slicing it at ASCII bytes
    /// costs nothing, unlike validating UTF-8 again).
    pub(super) text: &'a str,
    pub(super) i: usize,
    /// A backslash escapes the next byte in `'...'` and `N'...'` too, as in `E'...'`: the
    /// server's `standard_conforming_strings` is `off`.
    pub(super) backslash_strings: bool,
    /// A `'...'` or `N'...'` literal held a backslash: with the other setting of
    /// `standard_conforming_strings` the text may read differently. Without one, both
    /// settings give the same tokens.
    pub(super) depends_on_setting: bool,
}

const START: u8 = 1; // may start an identifier
const CONT: u8 = 2; // may continue an identifier
pub(super) const SPACE: u8 = 4; // white space
pub(super) const LOOK: u8 = 8; // worth a look in the fast path: ( ; - / " t T

/// Byte classes, looked up once per byte: the lexer's inner loops are table lookups.
pub(super) static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            t[b] = START | CONT;
        } else if c.is_ascii_digit() || c == b'$' {
            t[b] = CONT;
        } else if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            t[b] = SPACE;
        }
        if matches!(c, b'(' | b';' | b'-' | b'/' | b'"' | b't' | b'T' | b'_') {
            t[b] |= LOOK;
        }
        b += 1;
    }
    t
};

#[inline]
pub(super) fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & START != 0
}

#[inline]
pub(super) fn is_ident_cont(b: u8) -> bool {
    CLASS[b as usize] & CONT != 0
}

#[inline]
pub(super) fn eq(word: &[u8], kw: &str) -> bool {
    word.eq_ignore_ascii_case(kw.as_bytes())
}

impl<'a> Lexer<'a> {
    /// A lexer at the start of `text`; `backslash_strings` as [`Lexer::backslash_strings`].
    pub(super) fn new(text: &'a str, backslash_strings: bool) -> Lexer<'a> {
        Lexer {
            s: text.as_bytes(),
            text,
            i: 0,
            backslash_strings,
            depends_on_setting: false,
        }
    }

    fn peek(&self, at: usize) -> u8 {
        self.s.get(at).copied().unwrap_or(0)
    }

    /// Skips a quoted run starting after the opening `q` (at `self.i`); `q` doubled is an
    /// escaped `q`; with `backslash`, a backslash escapes the next byte. Returns the content.
    fn quoted(&mut self, q: u8, backslash: bool) -> &'a [u8] {
        let start = self.i;
        let s = self.s;
        let mut i = start;
        while i < s.len() {
            let b = s[i];
            if backslash && b == b'\\' {
                i += 2;
                continue;
            }
            if b == q {
                if s.get(i + 1) == Some(&q) {
                    i += 2;
                    continue;
                }
                self.i = i + 1;
                return &s[start..i];
            }
            i += 1;
        }
        self.i = s.len();
        &s[start.min(s.len())..]
    }

    /// A `'...'` literal after its opening quote, read as `standard_conforming_strings` says.
    fn plain_string(&mut self) -> &'a [u8] {
        let body = self.quoted(b'\'', self.backslash_strings);
        if body.contains(&b'\\') {
            self.depends_on_setting = true;
        }
        body
    }

    /// Skips whitespace and comments.
    fn skip_blank(&mut self) {
        let s = self.s;
        while let Some(&b) = s.get(self.i) {
            if CLASS[b as usize] & SPACE != 0 {
                self.i += 1;
            } else if b == b'-' && self.peek(self.i + 1) == b'-' {
                match s[self.i..].iter().position(|&c| c == b'\n') {
                    Some(p) => self.i += p + 1,
                    None => self.i = s.len(),
                }
            } else if b == b'/' && self.peek(self.i + 1) == b'*' {
                let mut depth = 1usize;
                self.i += 2;
                while self.i < s.len() && depth > 0 {
                    if s[self.i] == b'/' && self.peek(self.i + 1) == b'*' {
                        depth += 1;
                        self.i += 2;
                    } else if s[self.i] == b'*' && self.peek(self.i + 1) == b'/' {
                        depth -= 1;
                        self.i += 2;
                    } else {
                        self.i += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    /// After a `U&"..."` name: the escape character of a `UESCAPE 'c'` clause, consumed, if
    /// one follows. Reads bytes only, no tokens, so a run of such names stays linear.
    fn uescape(&mut self) -> Option<u8> {
        let at = self.i;
        self.skip_blank();
        let s = self.s;
        let word_end = self.i + 7;
        let is_clause = s.get(self.i..word_end).is_some_and(|w| eq(w, "uescape"))
            && !s.get(word_end).is_some_and(|&b| is_ident_cont(b));
        if is_clause {
            self.i = word_end;
            self.skip_blank();
            if let (Some(b'\''), Some(&c), Some(b'\'')) =
                (s.get(self.i), s.get(self.i + 1), s.get(self.i + 2))
            {
                self.i += 3;
                return Some(c);
            }
        }
        self.i = at;
        None
    }

    /// The next token and the offset where it starts, skipping whitespace and comments.
    pub(super) fn next(&mut self) -> Option<(usize, Tok<'a>)> {
        let s = self.s;
        self.skip_blank();
        let b = *s.get(self.i)?;
        if CLASS[b as usize] & START != 0 {
            // The most common token first: an identifier or keyword.
            return Some((self.i, self.word()));
        }
        let start = self.i;
        let b = s[start];
        self.i += 1;
        let tok = match b {
            b'(' => Tok::LParen,
            b')' => Tok::RParen,
            b',' => Tok::Comma,
            b'.' => Tok::Dot,
            b';' => Tok::Semi,
            b'\'' => Tok::Str(self.plain_string()),
            b'"' => Tok::Quoted(self.quoted(b'"', false)),
            b'$' => self.dollar(start),
            b'0'..=b'9' => {
                while self.i < s.len() && (s[self.i].is_ascii_alphanumeric() || s[self.i] == b'_') {
                    self.i += 1;
                }
                Tok::Other
            }
            _ => Tok::Other,
        };
        Some((start, tok))
    }

    /// An identifier or keyword at `self.i`, or a string literal with a prefix (`E'...'`,
    /// `B'...'`, `X'...'`, `N'...'`, `U&'...'`, `U&"..."`).
    fn word(&mut self) -> Tok<'a> {
        let s = self.s;
        let start = self.i;
        let i = match s[start + 1..].iter().position(|&c| !is_ident_cont(c)) {
            Some(p) => start + 1 + p,
            None => s.len(),
        };
        self.i = i;
        let word = &s[start..i];
        if word.len() > 1 {
            return Tok::Word(word);
        }
        match (word[0], self.peek(i)) {
            (b'e' | b'E', b'\'') => {
                self.i += 1;
                Tok::Str(self.quoted(b'\'', true))
            }
            (b'n' | b'N', b'\'') => {
                self.i += 1;
                Tok::Str(self.plain_string())
            }
            // Bit strings take no escapes whatever the setting (a backslash is an error).
            (b'b' | b'B' | b'x' | b'X', b'\'') => {
                self.i += 1;
                Tok::Str(self.quoted(b'\'', false))
            }
            (b'u' | b'U', b'&') if matches!(self.peek(i + 1), b'\'' | b'"') => {
                let q = self.peek(i + 1);
                self.i += 2;
                let body = self.quoted(q, false);
                if q == b'"' {
                    // An optional `UESCAPE 'c'` names the escape character.
                    let esc = self.uescape().unwrap_or(b'\\');
                    Tok::UQuoted(body, esc)
                } else {
                    Tok::Str(body)
                }
            }
            _ => Tok::Word(word),
        }
    }

    /// After a `$` at `start`: a parameter (`$1`), a dollar-quoted string, or an operator.
    fn dollar(&mut self, start: usize) -> Tok<'a> {
        let s = self.s;
        let mut i = self.i;
        if i < s.len() && s[i].is_ascii_digit() {
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
            self.i = i;
            return Tok::Other;
        }
        if i < s.len() && is_ident_start(s[i]) {
            i += 1;
            while i < s.len() && is_ident_cont(s[i]) && s[i] != b'$' {
                i += 1;
            }
        }
        if s.get(i) != Some(&b'$') {
            return Tok::Other;
        }
        // Both cuts are at a `$`, so they are char boundaries of the text.
        let delim = &self.text[start..=i];
        let body = i + 1;
        // A two-way search: linear in the length of the text whatever the tag.
        match self.text[body..].find(delim) {
            Some(p) => {
                self.i = body + p + delim.len();
                Tok::Dollar(&s[body..body + p])
            }
            None => {
                self.i = s.len();
                Tok::Dollar(&s[body..])
            }
        }
    }
}
