//! The paged KV cache's allocator, shared by the serving engine and the backends: fixed-size blocks of
//! [`KV_BLOCK`] positions, a block table per slot (logical block -> physical block of a shared pool,
//! ring index `p % cap` for sliding-window layers), blocks handed out as a sequence grows and returned
//! when it leaves. Also the arithmetic that sizes the pool from a memory budget.

use crate::graph::{Graph, WeightMap};

/// Positions per KV block (page). The CUDA attention kernel's `PAGE` (kernels/attention.cu) equals it.
pub const KV_BLOCK: usize = 16;

/// A logical block with no physical block behind it.
pub const UNMAPPED: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct PageTable {
    /// Ring capacity of the layers using this table (the window, or the maximum length).
    pub cap: usize,
    pub pages_per_slot: usize,
    /// `[slot * pages_per_slot + logical page]` -> physical page, or `UNMAPPED`.
    pub table: Vec<u32>,
    free: Vec<u32>,
    total: usize,
}

impl PageTable {
    /// A pool of `pool_pages` physical pages for `slots` slots of ring capacity `cap`.
    pub fn new(slots: usize, cap: usize, pool_pages: usize) -> PageTable {
        let pps = cap.div_ceil(KV_BLOCK);
        PageTable {
            cap,
            pages_per_slot: pps,
            table: vec![UNMAPPED; slots * pps],
            free: (0..pool_pages as u32).rev().collect(),
            total: pool_pages,
        }
    }

    /// Physical pages in the pool.
    pub fn total_pages(&self) -> usize {
        self.total
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    pub fn used_pages(&self) -> usize {
        self.total - self.free.len()
    }

    /// A slot's block table: its logical pages' physical pages (`UNMAPPED` where none).
    pub fn slot_table(&self, slot: usize) -> &[u32] {
        &self.table[slot * self.pages_per_slot..(slot + 1) * self.pages_per_slot]
    }

    /// Table indices of the logical pages that positions `[start, end)` of `slot` are written to (only
    /// the last `cap` positions are kept), each once.
    fn pages_of(&self, slot: usize, start: usize, end: usize) -> Vec<usize> {
        let mut at = Vec::new();
        let mut p = start.max(end.saturating_sub(self.cap));
        while p < end {
            let ring = p % self.cap;
            let page = ring / KV_BLOCK;
            at.push(slot * self.pages_per_slot + page);
            // The next position on another page: the page's end, or the ring's end.
            p += ((page + 1) * KV_BLOCK).min(self.cap) - ring;
        }
        // At most `cap` positions, so only a step that wraps the ring onto the start of its first page
        // visits a page twice: as its first and its last.
        if at.len() > 1 && at.first() == at.last() {
            at.pop();
        }
        at
    }

    /// Pages that mapping positions `[start, end)` of `slot` would take from the pool.
    pub fn missing(&self, slot: usize, start: usize, end: usize) -> usize {
        self.pages_of(slot, start, end)
            .into_iter()
            .filter(|&at| self.table[at] == UNMAPPED)
            .count()
    }

    /// Map the pages that positions `[start, end)` of `slot` are written to (the last `cap` of them).
    /// Returns whether the table changed. When the pool cannot hold them all, nothing is mapped.
    pub fn map(&mut self, slot: usize, start: usize, end: usize) -> Result<bool, String> {
        let need = self.missing(slot, start, end);
        if need > self.free.len() {
            return Err(format!(
                "the KV cache has no free page for positions {start}..{end} of slot {slot} ({need} needed, {} free, {} in use)",
                self.free.len(),
                self.used_pages()
            ));
        }
        for at in self.pages_of(slot, start, end) {
            if self.table[at] == UNMAPPED {
                self.table[at] = self.free.pop().expect("counted above");
            }
        }
        Ok(need > 0)
    }

    /// Return a slot's pages to the pool. Returns whether the table changed.
    pub fn release(&mut self, slot: usize) -> bool {
        let mut changed = false;
        for at in slot * self.pages_per_slot..(slot + 1) * self.pages_per_slot {
            if self.table[at] != UNMAPPED {
                self.free.push(self.table[at]);
                self.table[at] = UNMAPPED;
                changed = true;
            }
        }
        changed
    }
}

/// Blocks a sequence of `len` positions holds (no sliding window).
pub fn blocks_for(len: usize) -> usize {
    len.div_ceil(KV_BLOCK)
}

/// Bytes one block takes over all of the graph's cache layers, keys and values, `elem_bytes` an element.
pub fn bytes_per_block(graph: &Graph, elem_bytes: usize) -> u64 {
    graph
        .cache_layers
        .iter()
        .map(|l| (2 * KV_BLOCK * l.n_kv_heads * l.head_dim * elem_bytes) as u64)
        .sum()
}

/// Bytes of the weights the graph uses, as stored in the checkpoint.
pub fn weight_bytes(graph: &Graph, weights: &WeightMap) -> u64 {
    graph
        .weight_names()
        .iter()
        .filter_map(|n| weights.get(*n))
        .map(|w| w.bytes().len() as u64)
        .sum()
}

/// Bytes of f32 activations for a step of `rows` token rows: every buffer the graph's nodes share
/// ([`Graph::buffer_slots`]), `rows` rounded up to a power of two as the GPU runners grow them.
pub fn activation_bytes(graph: &Graph, rows: usize) -> u64 {
    let cols: usize = graph.buffer_slots().1.iter().sum();
    (rows.next_power_of_two() * cols * 4) as u64
}

/// A memory budget for the KV cache: `utilization` of `total` bytes, less what is already `used`, the
/// `weights` and the activation `workspace`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvBudget {
    pub total: u64,
    pub utilization: f64,
    pub used: u64,
    pub weights: u64,
    pub workspace: u64,
    pub bytes_per_block: u64,
}

impl KvBudget {
    /// Bytes left for the KV cache (0 when the rest already takes more than the budget).
    pub fn kv_bytes(&self) -> u64 {
        let budget = (self.total as f64 * self.utilization).floor() as u64;
        budget.saturating_sub(self.used + self.weights + self.workspace)
    }

    /// Whole blocks that fit in [`KvBudget::kv_bytes`].
    pub fn blocks(&self) -> usize {
        (self.kv_bytes() / self.bytes_per_block.max(1)) as usize
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(n * 1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The machine's total memory (Linux `/proc/meminfo`), for backends without memory of their own.
pub fn system_memory() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::CacheLayer;

    #[test]
    fn pages_are_mapped_on_demand_and_returned_on_release() {
        let mut t = PageTable::new(2, 100, 14);
        assert_eq!(t.pages_per_slot, 7);
        assert_eq!(t.missing(0, 0, 20), 2);
        assert!(t.map(0, 0, 20).unwrap()); // positions 0..20: pages 0 and 1
        assert_eq!(
            (t.free_pages(), t.used_pages(), t.total_pages()),
            (12, 2, 14)
        );
        assert_eq!(&t.table[..3], &[0, 1, UNMAPPED]);
        assert_eq!(t.missing(0, 20, 21), 0);
        assert!(!t.map(0, 20, 21).unwrap()); // still page 1
        assert_eq!(t.missing(0, 32, 33), 1);
        assert!(t.map(1, 0, 1).unwrap());
        assert_eq!(t.table[7], 2);
        assert_eq!(t.slot_table(1)[..2], [2, UNMAPPED]);
        assert!(t.release(0));
        assert_eq!(t.free_pages(), 13);
        assert!(!t.release(0));
        assert!(t.slot_table(0).iter().all(|&p| p == UNMAPPED));
        // A released page is reused first.
        assert!(t.map(0, 0, 1).unwrap());
        assert_eq!(t.table[0], 1);
    }

    #[test]
    fn a_ring_maps_only_its_capacity_and_wraps() {
        let mut t = PageTable::new(1, 40, 3);
        assert_eq!(t.pages_per_slot, 3);
        // 100 positions in one step: only the last 40 are written, ring indices 20..40 and 0..20.
        assert_eq!(t.missing(0, 0, 100), 3);
        assert!(t.map(0, 0, 100).unwrap());
        assert_eq!(t.free_pages(), 0);
        assert!(t.table.iter().all(|&p| p != UNMAPPED));
        assert!(!t.map(0, 100, 140).unwrap());
    }

    #[test]
    fn a_ring_wraps_position_by_position() {
        // cap 40: pages hold ring rows 0..16, 16..32, 32..40.
        let mut t = PageTable::new(1, 40, 3);
        t.map(0, 0, 10).unwrap();
        assert_eq!(t.slot_table(0), &[0, UNMAPPED, UNMAPPED]);
        t.map(0, 10, 35).unwrap();
        assert_eq!(t.slot_table(0), &[0, 1, 2]);
        // Position 40 is ring row 0 again: page 0, nothing new.
        assert_eq!(t.missing(0, 35, 48), 0);
        // After a release the next position 41 (ring row 1) needs only page 0.
        t.release(0);
        assert_eq!(t.missing(0, 41, 42), 1);
        t.map(0, 41, 42).unwrap();
        assert_eq!(t.slot_table(0)[0], 2);
    }

    #[test]
    fn page_steps_match_position_by_position_mapping() {
        // Which logical pages a step maps, against the position-by-position rule `(p % cap) / KV_BLOCK`
        // over the last `cap` positions, for rings that are and are not whole pages, over random steps.
        let mut seed = 12345u64;
        let mut rnd = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for cap in [1, 15, 16, 17, 40, 48, 100] {
            let mut t = PageTable::new(1, cap, cap.div_ceil(KV_BLOCK));
            let mut want = vec![false; t.pages_per_slot];
            let mut len = 0;
            for _ in 0..50 {
                let n = 1 + rnd(2 * cap);
                for p in (len + n).saturating_sub(cap).max(len)..len + n {
                    want[(p % cap) / KV_BLOCK] = true;
                }
                let new = want.iter().filter(|&&w| w).count() - t.used_pages();
                assert_eq!(
                    t.missing(0, len, len + n),
                    new,
                    "cap {cap}, {len}..{}",
                    len + n
                );
                t.map(0, len, len + n).unwrap();
                len += n;
                let got: Vec<bool> = t.slot_table(0).iter().map(|&p| p != UNMAPPED).collect();
                assert_eq!(got, want, "cap {cap}");
            }
        }
    }

    #[test]
    fn an_exhausted_pool_is_an_error_naming_the_slot_and_maps_nothing() {
        let mut t = PageTable::new(2, 32, 3);
        t.map(0, 0, 32).unwrap();
        let e = t.map(1, 0, 17).unwrap_err();
        assert!(
            e.contains("no free page") && e.contains("slot 1") && e.contains("2 needed, 1 free"),
            "{e}"
        );
        assert_eq!(t.slot_table(1), &[UNMAPPED, UNMAPPED]);
        assert_eq!(t.free_pages(), 1);
        assert!(t.map(1, 0, 16).unwrap());
        assert!(t.map(1, 16, 17).is_err());
    }

    #[test]
    fn mem_total_is_read_from_meminfo() {
        let text = "MemFree:  100 kB\nMemTotal:       16318712 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_mem_total(text), Some(16_318_712 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn block_budget_arithmetic() {
        let layer = |window| CacheLayer {
            n_kv_heads: 2,
            head_dim: 8,
            window,
            k_scale: None,
            v_scale: None,
        };
        let mut graph = Graph::new(10);
        graph.cache_layers = vec![layer(None), layer(Some(4))];
        // Two layers, keys and values, 16 positions of 2 x 8 f32: 2 * 2 * 16 * 16 * 4 = 4096 bytes.
        assert_eq!(bytes_per_block(&graph, 4), 4096);
        assert_eq!(bytes_per_block(&graph, 1), 1024);
        // 0.5 of 1 MiB = 524288; less 1000 + 100000 + 20000 = 403288 bytes; 98 blocks of 4096 (401408).
        let b = KvBudget {
            total: 1 << 20,
            utilization: 0.5,
            used: 1000,
            weights: 100_000,
            workspace: 20_000,
            bytes_per_block: 4096,
        };
        assert_eq!(b.kv_bytes(), 403_288);
        assert_eq!(b.blocks(), 98);
        // A budget smaller than the weights leaves nothing.
        let small = KvBudget {
            utilization: 0.1,
            ..b
        };
        assert_eq!((small.kv_bytes(), small.blocks()), (0, 0));
        assert_eq!((blocks_for(0), blocks_for(16), blocks_for(17)), (0, 1, 2));
        // Activations: embed (8 columns) -> norm (8) -> logits (10). The embedding's buffer is free once
        // the norm has read it and is widened for the logits: buffers of 10 and 8 columns, 20 rows
        // rounded to 32, f32: 32 * 18 * 4 = 2304 bytes.
        let x = graph.add(
            "embed",
            crate::graph::Op::Embed {
                table: "e".into(),
                scale: 1.0,
            },
            &[],
            8,
        );
        let n = graph.add(
            "norm",
            crate::graph::Op::RmsNorm {
                weight: None,
                group: 8,
                eps: 1e-6,
                add_one: false,
            },
            &[x],
            8,
        );
        graph.output = graph.add("logits", crate::graph::Op::Add, &[n, n], 10);
        assert_eq!(activation_bytes(&graph, 20), 2304);
    }
}
