//! The keys and values a sequence has seen, kept between decoding steps: per-sequence
//! vectors on the CPU ([`HeadsKv`]) or blocks of a paged pool ([`super::paged`]).

use super::paged::BlockTable;

/// One sequence's keys and values, per block: what a model's decoding step attends
/// over and appends to.
pub struct SequenceCache {
    pub(crate) kv: SequenceKv,
    pub(crate) len: usize,
}

pub(crate) enum SequenceKv {
    /// Its own vectors, per block.
    Own(Vec<HeadsKv>),
    /// Blocks of a [`PagedKv`] pool.
    Paged(BlockTable),
}

impl SequenceCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool blocks the sequence holds, to give back when it ends.
    pub fn into_blocks(self) -> Option<BlockTable> {
        match self.kv {
            SequenceKv::Paged(table) => Some(table),
            SequenceKv::Own(_) => None,
        }
    }
}

/// A sequence's keys and values in one block, head by head: each head's keys (and values)
/// lie together, token after token, so attention reads them in order. Token by token,
/// with a token's heads side by side, a head's 64 values lay 4 KiB apart on the 560m
/// shape: every key a page of its own, and a decoding step spent ~50 ms of its ~130 in
/// attention that reads 0.2 GB.
pub(crate) struct HeadsKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    heads: usize,
    dim: usize,
    /// Tokens each head has room for.
    room: usize,
    len: usize,
}

impl HeadsKv {
    pub(crate) fn with_room(heads: usize, dim: usize, room: usize) -> Self {
        let room = room.max(1);
        Self {
            keys: vec![0.0; heads * room * dim],
            values: vec![0.0; heads * room * dim],
            heads,
            dim,
            room,
            len: 0,
        }
    }

    /// Appends a token whose key and value of head `h` are `parts(h)`; past the room made
    /// at the start, every head's run moves to a larger one.
    pub(crate) fn push_with<'a>(&mut self, parts: impl Fn(usize) -> (&'a [f32], &'a [f32])) {
        let (heads, dim) = (self.heads, self.dim);
        if self.len == self.room {
            let room = (2 * self.room).max(16);
            for vectors in [&mut self.keys, &mut self.values] {
                let mut moved = vec![0.0; heads * room * dim];
                for (to, from) in moved
                    .chunks_exact_mut(room * dim)
                    .zip(vectors.chunks_exact(self.room * dim))
                {
                    to[..from.len()].copy_from_slice(from);
                }
                *vectors = moved;
            }
            self.room = room;
        }
        for h in 0..heads {
            let (key, value) = parts(h);
            let at = (h * self.room + self.len) * dim;
            self.keys[at..at + dim].copy_from_slice(key);
            self.values[at..at + dim].copy_from_slice(value);
        }
        self.len += 1;
    }

    /// Tokens held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The keys and values of head `h`'s first `tokens` tokens.
    pub(crate) fn head(&self, h: usize, tokens: usize) -> (&[f32], &[f32]) {
        let at = h * self.room * self.dim;
        let end = at + tokens.min(self.len) * self.dim;
        (&self.keys[at..end], &self.values[at..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_kv_keeps_every_token_past_its_room() {
        let (heads, dim) = (3, 2);
        let mut kv = HeadsKv::with_room(heads, dim, 2);
        // Token t, head h: key 100t + 10h + i, value -(that).
        let key = |t: usize, h: usize| -> Vec<f32> {
            (0..dim).map(|i| (100 * t + 10 * h + i) as f32).collect()
        };
        for t in 0..37 {
            let keys: Vec<Vec<f32>> = (0..heads).map(|h| key(t, h)).collect();
            let values: Vec<Vec<f32>> = keys
                .iter()
                .map(|k| k.iter().map(|v| -v).collect())
                .collect();
            kv.push_with(|h| (&keys[h], &values[h]));
        }
        for h in 0..heads {
            let (keys, values) = kv.head(h, 37);
            let expected: Vec<f32> = (0..37).flat_map(|t| key(t, h)).collect();
            assert_eq!(keys, expected);
            assert!(values.iter().zip(&expected).all(|(v, e)| *v == -e));
            assert_eq!(kv.head(h, 5).0, &expected[..5 * dim]);
        }
    }
}
