//! What ranks tell each other before they move a tensor: the part of the NCCL communicator
//! that needs no GPU, tested on the CPU.
//!
//! NCCL moves bytes and checks nothing: ranks that call different collectives, or pass shapes
//! that do not fit, get garbage or a hang. So before every collective each rank all-gathers a
//! small [`Meta`] record — which operation, its parameters, its position in the rank's
//! sequence, the tensor's dtype and shape — and [`agree`] turns any disagreement into the
//! contract's errors ([`CommError::Mismatch`], [`CommError::Shape`]) on every rank at once.
//! The same records give each rank the sizes it receives (an all-gather whose ranks hold
//! different lengths, an all-to-all's incoming chunks), which NCCL itself cannot tell it.
//! A point-to-point message is preceded by a [`Header`] (tag, dtype, shape), which the
//! receiver checks against the tag it expects ([`CommError::TagMismatch`]) before it
//! allocates the payload.
//!
//! Records are `u32` words, so they travel as NCCL `uint32` buffers.

use parallel_core::{CommError, Tag};

/// Words of a [`Meta`] record.
pub const META_WORDS: usize = 16;
/// Words of a [`Header`].
pub const HEADER_WORDS: usize = 48;
/// Most dims a tensor may have on this communicator.
pub const MAX_DIMS: usize = 8;
/// Longest tag kind a [`Header`] carries (bytes).
pub const MAX_KIND: usize = 128;

const MAGIC: u32 = 0x4e43_434c; // "NCCL"

/// A collective, with the parameters every rank must pass alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// All-gather along `dim`.
    AllGather {
        /// The concatenated dim.
        dim: usize,
    },
    /// All-to-all: split along `scatter`, concatenate along `gather`; `sizes` is a
    /// fingerprint of the split sizes (the same on every rank).
    AllToAll {
        /// The split dim.
        scatter: usize,
        /// The concatenated dim.
        gather: usize,
        /// [`fingerprint`] of the split sizes.
        sizes: u32,
    },
    /// Sum all-reduce.
    AllReduce,
    /// Broadcast from group rank `root`.
    Broadcast {
        /// The sending rank.
        root: usize,
    },
    /// Barrier.
    Barrier,
    /// Forming a sub-communicator; `members` is a [`fingerprint`] of its world ranks.
    Split {
        /// [`fingerprint`] of the members.
        members: u32,
    },
}

impl Collective {
    fn code(self) -> (u32, [u32; 3]) {
        match self {
            Collective::AllGather { dim } => (1, [dim as u32, 0, 0]),
            Collective::AllToAll { scatter, gather, sizes } => {
                (2, [scatter as u32, gather as u32, sizes])
            }
            Collective::AllReduce => (3, [0; 3]),
            Collective::Broadcast { root } => (4, [root as u32, 0, 0]),
            Collective::Barrier => (5, [0; 3]),
            Collective::Split { members } => (6, [members, 0, 0]),
        }
    }

    fn from_code(code: u32, p: [u32; 3]) -> Option<Self> {
        Some(match code {
            1 => Collective::AllGather { dim: p[0] as usize },
            2 => {
                Collective::AllToAll { scatter: p[0] as usize, gather: p[1] as usize, sizes: p[2] }
            }
            3 => Collective::AllReduce,
            4 => Collective::Broadcast { root: p[0] as usize },
            5 => Collective::Barrier,
            6 => Collective::Split { members: p[0] },
            _ => return None,
        })
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Collective::AllGather { .. } => "all_gather",
            Collective::AllToAll { .. } => "all_to_all",
            Collective::AllReduce => "all_reduce",
            Collective::Broadcast { .. } => "broadcast",
            Collective::Barrier => "barrier",
            Collective::Split { .. } => "split",
        }
    }
}

/// FNV-1a of a list of sizes, folded to 32 bits: equal lists give equal fingerprints.
pub fn fingerprint(values: &[usize]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for v in values.iter().map(|&v| v as u64).chain([values.len() as u64]) {
        for b in v.to_le_bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// One rank's account of the collective it is about to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The collective.
    pub op: Collective,
    /// Its position among the rank's collectives on this communicator (mod 2³²).
    pub seq: u32,
    /// The dtype's code ([`dtype_code`]; 0 where no tensor is involved).
    pub dtype: u32,
    /// The tensor's shape (empty where no tensor is involved).
    pub shape: Vec<usize>,
}

/// Which of this crate's dtypes a Burn dtype is (f32 1, f16 2, bf16 3).
pub fn dtype_code(d: burn::tensor::DType) -> Option<u32> {
    use burn::tensor::DType;
    match d {
        DType::F32 => Some(1),
        DType::F16 => Some(2),
        DType::BF16 => Some(3),
        _ => None,
    }
}

fn dtype_name(code: u32) -> &'static str {
    match code {
        1 => "f32",
        2 => "f16",
        3 => "bf16",
        _ => "no tensor",
    }
}

fn check_dims(shape: &[usize], what: &str) -> Result<(), String> {
    if shape.len() > MAX_DIMS {
        return Err(format!("{what} has {} dims; at most {MAX_DIMS} travel", shape.len()));
    }
    if let Some(&d) = shape.iter().find(|&&d| d > u32::MAX as usize) {
        return Err(format!("{what} has a dim of {d}, beyond 2^32"));
    }
    Ok(())
}

impl Meta {
    /// The record sent to every rank.
    ///
    /// # Errors
    /// The shape does not fit a record (more than [`MAX_DIMS`] dims, a dim ≥ 2³²).
    pub fn encode(&self) -> Result<[u32; META_WORDS], String> {
        check_dims(&self.shape, "the tensor")?;
        let (code, p) = self.op.code();
        let mut w = [0u32; META_WORDS];
        w[0] = MAGIC;
        w[1] = code;
        w[2] = self.seq;
        w[3] = self.dtype;
        w[4] = self.shape.len() as u32;
        for (i, &d) in self.shape.iter().enumerate() {
            w[5 + i] = d as u32;
        }
        w[13..16].copy_from_slice(&p);
        Ok(w)
    }

    /// A record back; `None` if it is not one.
    pub fn decode(w: &[u32]) -> Option<Meta> {
        if w.len() != META_WORDS || w[0] != MAGIC || w[4] as usize > MAX_DIMS {
            return None;
        }
        let op = Collective::from_code(w[1], [w[13], w[14], w[15]])?;
        let shape = w[5..5 + w[4] as usize].iter().map(|&d| d as usize).collect();
        Some(Meta { op, seq: w[2], dtype: w[3], shape })
    }

    fn describe(&self) -> String {
        let params = match self.op {
            Collective::AllGather { dim } => format!("(dim {dim})"),
            Collective::AllToAll { scatter, gather, .. } => {
                format!("(scatter dim {scatter}, gather dim {gather})")
            }
            Collective::Broadcast { root } => format!("(root {root})"),
            _ => String::new(),
        };
        format!(
            "{}{params} #{} of a {} tensor {:?}",
            self.op.name(),
            self.seq,
            dtype_name(self.dtype),
            self.shape
        )
    }
}

/// Checks that every rank's record agrees with this rank's (`metas[me]`), for a group of
/// world ranks `members`; `op` names the operation in errors.
///
/// # Errors
/// [`CommError::Mismatch`]: a rank called another collective, with other parameters, or at
/// another position of its sequence; [`CommError::Shape`]: dtypes differ, or shapes that the
/// collective needs equal are not (all dims for all-reduce and broadcast; all but the
/// concatenated dim for all-gather; all but the split and concatenated dims for all-to-all).
/// A record that does not decode is a mismatch too (a peer out of step).
pub fn agree(
    op: &str,
    members: &[usize],
    me: usize,
    records: &[Vec<u32>],
) -> Result<Vec<Meta>, CommError> {
    let rank = members[me];
    let mine = Meta::decode(&records[me]).ok_or_else(|| CommError::Shape {
        op: op.into(),
        rank,
        detail: "this rank's own record did not survive the exchange".into(),
    })?;
    let mut metas = Vec::with_capacity(records.len());
    for (j, rec) in records.iter().enumerate() {
        let Some(theirs) = Meta::decode(rec) else {
            return Err(CommError::Mismatch {
                group: members.to_vec(),
                rank,
                ours: mine.describe(),
                other_rank: members[j],
                theirs: "something that is not a collective of this communicator (out of step)"
                    .into(),
            });
        };
        if theirs.op != mine.op || theirs.seq != mine.seq {
            return Err(CommError::Mismatch {
                group: members.to_vec(),
                rank,
                ours: mine.describe(),
                other_rank: members[j],
                theirs: theirs.describe(),
            });
        }
        let shape_err = |detail: String| CommError::Shape { op: op.into(), rank, detail };
        if theirs.dtype != mine.dtype {
            return Err(shape_err(format!(
                "rank {} passed a {} tensor, this rank a {} one",
                members[j],
                dtype_name(theirs.dtype),
                dtype_name(mine.dtype)
            )));
        }
        let differ = |skip: &[usize]| {
            theirs.shape.len() != mine.shape.len()
                || (0..mine.shape.len())
                    .any(|d| !skip.contains(&d) && theirs.shape[d] != mine.shape[d])
        };
        let bad = match mine.op {
            Collective::AllReduce | Collective::Broadcast { .. } => differ(&[]),
            Collective::AllGather { dim } => differ(&[dim]),
            Collective::AllToAll { scatter, gather, .. } => differ(&[scatter, gather]),
            Collective::Barrier | Collective::Split { .. } => false,
        };
        if bad {
            return Err(shape_err(format!(
                "{} needs shapes that agree: rank {} passed {:?}, this rank {:?}",
                mine.op.name(),
                members[j],
                theirs.shape,
                mine.shape
            )));
        }
        metas.push(theirs);
    }
    Ok(metas)
}

/// Sizes along `dim` of every rank's tensor, from agreed records.
pub fn sizes_along(metas: &[Meta], dim: usize) -> Vec<usize> {
    metas.iter().map(|m| m.shape[dim]).collect()
}

/// The shape of the chunk rank `me` receives from each rank in an all-to-all that splits
/// along `scatter` into `scatter_sizes`: the sender's shape with `scatter_sizes[me]` there.
pub fn all_to_all_incoming(
    metas: &[Meta],
    me: usize,
    scatter: usize,
    scatter_sizes: &[usize],
) -> Vec<Vec<usize>> {
    metas
        .iter()
        .map(|m| {
            let mut s = m.shape.clone();
            s[scatter] = scatter_sizes[me];
            s
        })
        .collect()
}

/// What precedes a point-to-point payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The tag's kind.
    pub kind: String,
    /// The tag's step, patch and layer.
    pub place: [u32; 3],
    /// [`dtype_code`] of the payload.
    pub dtype: u32,
    /// The payload's shape.
    pub shape: Vec<usize>,
}

impl Header {
    /// The header of a message tagged `tag` carrying a `dtype` tensor of `shape`.
    pub fn new(tag: Tag, dtype: u32, shape: &[usize]) -> Self {
        Header {
            kind: tag.kind.to_string(),
            place: [tag.step, tag.patch, tag.layer],
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Its words.
    ///
    /// # Errors
    /// The shape or the kind does not fit ([`MAX_DIMS`], [`MAX_KIND`]).
    pub fn encode(&self) -> Result<[u32; HEADER_WORDS], String> {
        check_dims(&self.shape, "the payload")?;
        let kind = self.kind.as_bytes();
        if kind.len() > MAX_KIND {
            return Err(format!("the tag kind `{}` is longer than {MAX_KIND} bytes", self.kind));
        }
        let mut w = [0u32; HEADER_WORDS];
        w[0] = MAGIC;
        w[1] = self.dtype;
        w[2] = self.shape.len() as u32;
        for (i, &d) in self.shape.iter().enumerate() {
            w[3 + i] = d as u32;
        }
        w[11..14].copy_from_slice(&self.place);
        w[14] = kind.len() as u32;
        for (i, chunk) in kind.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            w[15 + i] = u32::from_le_bytes(b);
        }
        Ok(w)
    }

    /// A header back; `None` if the words are not one.
    pub fn decode(w: &[u32]) -> Option<Header> {
        if w.len() != HEADER_WORDS || w[0] != MAGIC || w[2] as usize > MAX_DIMS {
            return None;
        }
        let len = w[14] as usize;
        if len > MAX_KIND {
            return None;
        }
        let bytes: Vec<u8> = w[15..].iter().flat_map(|x| x.to_le_bytes()).take(len).collect();
        Some(Header {
            kind: String::from_utf8(bytes).ok()?,
            place: [w[11], w[12], w[13]],
            dtype: w[1],
            shape: w[3..3 + w[2] as usize].iter().map(|&d| d as usize).collect(),
        })
    }

    /// Whether it carries `tag`.
    pub fn is(&self, tag: &Tag) -> bool {
        self.kind == tag.kind && self.place == [tag.step, tag.patch, tag.layer]
    }

    /// Its tag, for an error: `expected`'s kind when the text is the same, else the text
    /// arrived (kept for the life of the process: this happens once, as a rank fails).
    pub fn tag(&self, expected: &Tag) -> Tag {
        let kind: &'static str = if self.kind == expected.kind {
            expected.kind
        } else {
            Box::leak(self.kind.clone().into_boxed_str())
        };
        Tag::new(kind).step(self.place[0]).patch(self.place[1]).layer(self.place[2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(op: Collective, seq: u32, shape: &[usize]) -> Vec<u32> {
        Meta { op, seq, dtype: 1, shape: shape.to_vec() }.encode().unwrap().to_vec()
    }

    #[test]
    fn records_round_trip() {
        for op in [
            Collective::AllGather { dim: 2 },
            Collective::AllToAll { scatter: 1, gather: 2, sizes: fingerprint(&[3, 5]) },
            Collective::AllReduce,
            Collective::Broadcast { root: 3 },
            Collective::Barrier,
            Collective::Split { members: fingerprint(&[0, 2]) },
        ] {
            let m = Meta { op, seq: 77, dtype: 3, shape: vec![2, 1024, 4_000_000_000] };
            assert_eq!(Meta::decode(&m.encode().unwrap()), Some(m));
        }
        let too_deep = Meta { op: Collective::AllReduce, seq: 0, dtype: 1, shape: vec![1; 9] };
        assert!(too_deep.encode().unwrap_err().contains("9 dims"));
        assert_eq!(Meta::decode(&[0; META_WORDS]), None);
    }

    #[test]
    fn agreeing_records_give_every_ranks_sizes() {
        let recs = vec![
            meta(Collective::AllGather { dim: 1 }, 4, &[2, 3, 8]),
            meta(Collective::AllGather { dim: 1 }, 4, &[2, 5, 8]),
        ];
        let metas = agree("all_gather #4", &[0, 1], 1, &recs).unwrap();
        assert_eq!(sizes_along(&metas, 1), vec![3, 5]);
        let a2a = Collective::AllToAll { scatter: 2, gather: 1, sizes: fingerprint(&[4, 4]) };
        let recs = vec![meta(a2a, 0, &[2, 3, 8]), meta(a2a, 0, &[2, 5, 8])];
        let metas = agree("all_to_all #0", &[0, 1], 0, &recs).unwrap();
        assert_eq!(all_to_all_incoming(&metas, 0, 2, &[4, 4]), vec![vec![2, 3, 4], vec![2, 5, 4]]);
    }

    #[test]
    fn disagreement_is_a_mismatch_or_a_shape_error_naming_the_other_rank() {
        let members = [0, 2];
        let e = agree(
            "all_gather #1",
            &members,
            0,
            &[
                meta(Collective::AllGather { dim: 0 }, 1, &[4]),
                meta(Collective::AllReduce, 1, &[4]),
            ],
        )
        .unwrap_err();
        match e {
            CommError::Mismatch { other_rank: 2, ours, theirs, .. } => {
                assert!(ours.starts_with("all_gather(dim 0) #1"), "{ours}");
                assert!(theirs.starts_with("all_reduce #1"), "{theirs}");
            }
            other => panic!("{other:?}"),
        }
        // Same collective, one rank a step behind.
        let e = agree(
            "all_reduce #3",
            &members,
            1,
            &[meta(Collective::AllReduce, 2, &[4]), meta(Collective::AllReduce, 3, &[4])],
        )
        .unwrap_err();
        assert!(matches!(e, CommError::Mismatch { other_rank: 0, .. }), "{e}");
        let e = agree(
            "all_reduce #0",
            &members,
            0,
            &[meta(Collective::AllReduce, 0, &[4, 2]), meta(Collective::AllReduce, 0, &[4, 3])],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rank 2 passed [4, 3], this rank [4, 2]"), "{e}");
        let e = agree(
            "all_gather #0",
            &members,
            0,
            &[
                meta(Collective::AllGather { dim: 0 }, 0, &[4, 2]),
                meta(Collective::AllGather { dim: 0 }, 0, &[5, 3]),
            ],
        )
        .unwrap_err();
        assert!(matches!(e, CommError::Shape { .. }), "{e}");
        let mut bf16 = Meta::decode(&meta(Collective::AllReduce, 0, &[4])).unwrap();
        bf16.dtype = 3;
        let e = agree(
            "all_reduce #0",
            &members,
            0,
            &[meta(Collective::AllReduce, 0, &[4]), bf16.encode().unwrap().to_vec()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rank 2 passed a bf16 tensor, this rank a f32 one"), "{e}");
        let e = agree(
            "barrier #0",
            &members,
            0,
            &[meta(Collective::Barrier, 0, &[]), vec![0; META_WORDS]],
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of step"), "{e}");
    }

    #[test]
    fn headers_carry_the_tag_and_shape() {
        let tag = Tag::new("activations").step(3).patch(1).layer(27);
        let h = Header::new(tag, 3, &[2, 512, 1152]);
        let back = Header::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(back, h);
        assert!(back.is(&tag));
        assert!(!back.is(&tag.step(4)));
        assert!(!back.is(&Tag::new("kv").step(3).patch(1).layer(27)));
        assert_eq!(back.tag(&Tag::new("kv")).to_string(), "activations(step=3, patch=1, layer=27)");
        let long = Header::new(Tag::new(Box::leak("x".repeat(129).into_boxed_str())), 1, &[1]);
        assert!(long.encode().unwrap_err().contains("longer than 128"));
        let full = Header::new(Tag::new(Box::leak("y".repeat(128).into_boxed_str())), 1, &[1]);
        assert_eq!(Header::decode(&full.encode().unwrap()).unwrap(), full);
    }

    #[test]
    fn fingerprints_tell_lists_apart() {
        assert_eq!(fingerprint(&[3, 5]), fingerprint(&[3, 5]));
        assert_ne!(fingerprint(&[3, 5]), fingerprint(&[5, 3]));
        assert_ne!(fingerprint(&[8]), fingerprint(&[8, 0]));
    }
}
