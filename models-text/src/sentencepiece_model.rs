//! Reading SentencePiece's `ModelProto` (`spiece.model`): the pieces with their scores and
//! types, and the normalizer's precompiled charsmap — what transformers 5.24 takes from the
//! file to build a T5 tokenizer (`SentencePieceExtractor`).
//!
//! # Why a hand-written reader
//!
//! The file is a protobuf message, and only a handful of its fields matter here
//! (`sentencepiece_model.proto`):
//!
//! | message | field | number | wire type |
//! |---|---|---|---|
//! | `ModelProto` | `pieces` (repeated `SentencePiece`) | 1 | length-delimited |
//! | | `trainer_spec` | 2 | length-delimited |
//! | | `normalizer_spec` | 3 | length-delimited |
//! | `SentencePiece` | `piece` (string), `score` (float), `type` (enum, default `NORMAL`) | 1, 2, 3 | len, fixed32, varint |
//! | `TrainerSpec` | `model_type` (enum, default `UNIGRAM`), `byte_fallback`, `unk_id` (default 0) | 3, 35, 40 | varint |
//! | `NormalizerSpec` | `name`, `precompiled_charsmap` (bytes), `add_dummy_prefix`, `remove_extra_whitespaces`, `escape_whitespaces` (default true) | 1–5 | len, len, varint… |
//!
//! The protobuf wire format is five encodings (varint, fixed64, length-delimited, the two
//! deprecated group markers, fixed32); reading them by hand is some eighty lines, adds no
//! dependency (`prost` would bring a derive macro and its build to every build of this crate
//! for three small messages), and lets every error say at which byte of the file it stopped.
//! Unknown fields are skipped, as any protobuf reader does, so newer SentencePiece files read.

use std::path::Path;

use crate::error::{Result, TextError};

/// A piece's type (`SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// `NORMAL` (1), the default.
    Normal,
    /// `UNKNOWN` (2): the unknown piece.
    Unknown,
    /// `CONTROL` (3): `<s>`, `</s>`, `<pad>`: never produced from text by SentencePiece.
    Control,
    /// `USER_DEFINED` (4): always emitted whole.
    UserDefined,
    /// `UNUSED` (5).
    Unused,
    /// `BYTE` (6): byte-fallback pieces `<0xNN>`.
    Byte,
    /// A value this reader does not know.
    Other(u64),
}

impl PieceType {
    fn from_wire(v: u64) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            v => Self::Other(v),
        }
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePiece {
    /// The piece (`▁` marks a word start).
    pub piece: String,
    /// Its log-probability (Unigram) or rank score (BPE).
    pub score: f32,
    /// Its type.
    pub piece_type: PieceType,
}

/// The fields of a `spiece.model` that transformers reads.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// The vocabulary, in id order.
    pub pieces: Vec<SentencePiece>,
    /// `trainer_spec.model_type`: 1 Unigram (the default), 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    /// `trainer_spec.unk_id` (default 0).
    pub unk_id: i64,
    /// `trainer_spec.byte_fallback`.
    pub byte_fallback: bool,
    /// `normalizer_spec.name` (e.g. `nmt_nfkc`).
    pub normalizer_name: String,
    /// `normalizer_spec.precompiled_charsmap`; `None` when absent or empty.
    pub precompiled_charsmap: Option<Vec<u8>>,
    /// `normalizer_spec.add_dummy_prefix` (default true).
    pub add_dummy_prefix: bool,
    /// `normalizer_spec.remove_extra_whitespaces` (default true).
    pub remove_extra_whitespaces: bool,
    /// `normalizer_spec.escape_whitespaces` (default true).
    pub escape_whitespaces: bool,
}

/// One field of a message: its number and its value.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// Walks the fields of one message; errors give the offset in the whole file.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the file.
    base: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn err(&self, what: &str) -> String {
        format!("{what} at byte {}", self.base + self.pos)
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let &b = self.buf.get(self.pos).ok_or_else(|| self.err("truncated varint"))?;
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end =
            end.ok_or_else(|| self.err(&format!("a field of {n} bytes runs past the end")))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `(field number, value, offset of the value in the file)`, or `None` at the end.
    fn next_field(&mut self) -> std::result::Result<Option<(u64, Value<'a>, usize)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        let at = self.base + self.pos;
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| self.err("length out of range"))?;
                let at = self.base + self.pos;
                return Ok(Some((number, Value::Bytes(self.take(n)?), at)));
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32([b[0], b[1], b[2], b[3]])
            }
            w => return Err(self.err(&format!("unsupported wire type {w} (field {number})"))),
        };
        Ok(Some((number, value, at)))
    }
}

fn utf8(bytes: &[u8], at: usize, what: &str) -> std::result::Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
}

impl SentencePieceModel {
    /// Reads and parses `spiece.model`.
    ///
    /// # Errors
    /// [`TextError::Io`] for an unreadable file; [`TextError::TokenizerLoad`] naming the file
    /// and the byte offset for a malformed one, or one without pieces.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&bytes).map_err(|message| TextError::TokenizerLoad {
            path: path.to_path_buf(),
            message: format!("not a SentencePiece model: {message}"),
        })
    }

    /// Parses the bytes of a `ModelProto`.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut model = SentencePieceModel {
            pieces: Vec::new(),
            model_type: 1,
            unk_id: 0,
            byte_fallback: false,
            normalizer_name: String::new(),
            precompiled_charsmap: None,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut fields = Fields::new(bytes, 0);
        while let Some((number, value, at)) = fields.next_field()? {
            match (number, value) {
                (1, Value::Bytes(b)) => model.pieces.push(parse_piece(b, at)?),
                (2, Value::Bytes(b)) => model.parse_trainer_spec(b, at)?,
                (3, Value::Bytes(b)) => model.parse_normalizer_spec(b, at)?,
                (1..=3, _) => return Err(format!("field {number} at byte {at} is not a message")),
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("no pieces".into());
        }
        Ok(model)
    }

    fn parse_trainer_spec(&mut self, b: &[u8], base: usize) -> std::result::Result<(), String> {
        let mut f = Fields::new(b, base);
        while let Some((number, value, _)) = f.next_field()? {
            match (number, value) {
                (3, Value::Varint(v)) => self.model_type = v,
                (35, Value::Varint(v)) => self.byte_fallback = v != 0,
                // int32: negative values are sign-extended to 64 bits on the wire.
                (40, Value::Varint(v)) => self.unk_id = i64::from(v as i32),
                _ => {}
            }
        }
        Ok(())
    }

    fn parse_normalizer_spec(&mut self, b: &[u8], base: usize) -> std::result::Result<(), String> {
        let mut f = Fields::new(b, base);
        while let Some((number, value, at)) = f.next_field()? {
            match (number, value) {
                (1, Value::Bytes(s)) => self.normalizer_name = utf8(s, at, "normalizer name")?,
                (2, Value::Bytes(s)) => {
                    self.precompiled_charsmap = (!s.is_empty()).then(|| s.to_vec())
                }
                (3, Value::Varint(v)) => self.add_dummy_prefix = v != 0,
                (4, Value::Varint(v)) => self.remove_extra_whitespaces = v != 0,
                (5, Value::Varint(v)) => self.escape_whitespaces = v != 0,
                _ => {}
            }
        }
        Ok(())
    }

    /// `(piece, score)` in id order, scores widened to f64 as Python's floats hold them.
    pub fn vocab_scores(&self) -> Vec<(String, f64)> {
        self.pieces.iter().map(|p| (p.piece.clone(), f64::from(p.score))).collect()
    }
}

fn parse_piece(b: &[u8], base: usize) -> std::result::Result<SentencePiece, String> {
    let mut piece =
        SentencePiece { piece: String::new(), score: 0.0, piece_type: PieceType::Normal };
    let mut f = Fields::new(b, base);
    while let Some((number, value, at)) = f.next_field()? {
        match (number, value) {
            (1, Value::Bytes(s)) => piece.piece = utf8(s, at, "piece")?,
            (2, Value::Fixed32(s)) => piece.score = f32::from_le_bytes(s),
            (3, Value::Varint(v)) => piece.piece_type = PieceType::from_wire(v),
            (1..=3, _) => {
                return Err(format!("piece field {number} at byte {at} has the wrong type"));
            }
            _ => {}
        }
    }
    Ok(piece)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(number: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn piece(text: &str, score: f32, kind: Option<u64>) -> Vec<u8> {
        let mut p = Vec::new();
        bytes_field(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        if let Some(k) = kind {
            varint(3 << 3, &mut p);
            varint(k, &mut p);
        }
        p
    }

    #[test]
    fn reads_pieces_specs_and_skips_unknown_fields() {
        let mut m = Vec::new();
        bytes_field(1, &piece("<unk>", 0.0, Some(2)), &mut m);
        bytes_field(1, &piece("▁a", -1.5, None), &mut m);
        let mut trainer = Vec::new();
        varint(40 << 3, &mut trainer);
        varint((-1i64) as u64, &mut trainer); // sign-extended int32
        varint(99 << 3 | 1, &mut trainer); // unknown fixed64 field
        trainer.extend_from_slice(&[0; 8]);
        bytes_field(2, &trainer, &mut m);
        let mut norm = Vec::new();
        bytes_field(1, b"nmt_nfkc", &mut norm);
        bytes_field(2, &[1, 2, 3], &mut norm);
        varint(3 << 3, &mut norm);
        varint(0, &mut norm);
        bytes_field(3, &norm, &mut m);
        bytes_field(7, b"ignored", &mut m);
        let model = SentencePieceModel::parse(&m).unwrap();
        assert_eq!(model.pieces.len(), 2);
        assert_eq!(model.pieces[0].piece_type, PieceType::Unknown);
        assert_eq!(model.pieces[1].piece_type, PieceType::Normal);
        assert_eq!(model.pieces[1].score, -1.5);
        assert_eq!(model.unk_id, -1);
        assert_eq!(model.normalizer_name, "nmt_nfkc");
        assert_eq!(model.precompiled_charsmap.as_deref(), Some(&[1u8, 2, 3][..]));
        assert!(!model.add_dummy_prefix && model.remove_extra_whitespaces);
    }

    #[test]
    fn malformed_input_names_the_offset() {
        let mut m = Vec::new();
        bytes_field(1, &piece("a", 0.0, None), &mut m);
        m.truncate(m.len() - 2);
        let e = SentencePieceModel::parse(&m).unwrap_err();
        assert!(e.contains("byte"), "{e}");
        assert!(SentencePieceModel::parse(b"").unwrap_err().contains("no pieces"));
        // A JSON file is not a model.
        assert!(SentencePieceModel::parse(b"{\"version\": 1}").is_err());
    }
}
