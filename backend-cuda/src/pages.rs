//! Page tables of the paged KV cache: each slot's logical pages (ring index `p % cap`, `PAGE` positions a
//! page) map to physical pages of a shared pool, handed out as a sequence grows and returned on release.

/// Positions per page (kernels/attention.cu `PAGE`).
pub const PAGE: usize = 16;

pub const UNMAPPED: u32 = u32::MAX;

pub struct PageTable {
    /// Ring capacity of the layers using this table (the window, or the maximum length).
    pub cap: usize,
    pub pages_per_slot: usize,
    /// `[slot * pages_per_slot + logical page]` -> physical page, or `UNMAPPED`.
    pub table: Vec<u32>,
    free: Vec<u32>,
}

impl PageTable {
    /// A pool of `pool_pages` physical pages for `slots` slots of ring capacity `cap`.
    pub fn new(slots: usize, cap: usize, pool_pages: usize) -> PageTable {
        let pps = cap.div_ceil(PAGE);
        PageTable {
            cap,
            pages_per_slot: pps,
            table: vec![UNMAPPED; slots * pps],
            free: (0..pool_pages as u32).rev().collect(),
        }
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Map the pages that positions `[start, end)` of `slot` are written to (the last `cap` of them).
    /// Returns whether the table changed.
    pub fn map(&mut self, slot: usize, start: usize, end: usize) -> Result<bool, String> {
        let mut changed = false;
        let first = start.max(end.saturating_sub(self.cap));
        let mut p = first;
        while p < end {
            let at = slot * self.pages_per_slot + (p % self.cap) / PAGE;
            if self.table[at] == UNMAPPED {
                self.table[at] = self.free.pop().ok_or_else(|| {
                    format!(
                        "the KV cache has no free page for position {p} of slot {slot} ({} pages in use)",
                        self.table.iter().filter(|&&x| x != UNMAPPED).count()
                    )
                })?;
                changed = true;
            }
            p += 1;
        }
        Ok(changed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_mapped_on_demand_and_returned_on_release() {
        let mut t = PageTable::new(2, 100, 14);
        assert_eq!(t.pages_per_slot, 7);
        assert!(t.map(0, 0, 20).unwrap()); // positions 0..20: pages 0 and 1
        assert_eq!(t.free_pages(), 12);
        assert_eq!(&t.table[..3], &[0, 1, UNMAPPED]);
        assert!(!t.map(0, 20, 21).unwrap()); // still page 1
        assert!(t.map(1, 0, 1).unwrap());
        assert_eq!(t.table[7], 2);
        assert!(t.release(0));
        assert_eq!(t.free_pages(), 13);
        assert!(!t.release(0));
        // A released page is reused first.
        assert!(t.map(0, 0, 1).unwrap());
        assert_eq!(t.table[0], 1);
    }

    #[test]
    fn a_ring_maps_only_its_capacity_and_wraps() {
        let mut t = PageTable::new(1, 40, 3);
        assert_eq!(t.pages_per_slot, 3);
        // 100 positions in one step: only the last 40 are written, ring indices 20..40 and 0..20.
        assert!(t.map(0, 0, 100).unwrap());
        assert_eq!(t.free_pages(), 0);
        assert!(t.table.iter().all(|&p| p != UNMAPPED));
        assert!(!t.map(0, 100, 140).unwrap());
    }

    #[test]
    fn an_exhausted_pool_is_an_error_naming_the_slot() {
        let mut t = PageTable::new(2, 32, 2);
        t.map(0, 0, 32).unwrap();
        let e = t.map(1, 0, 1).unwrap_err();
        assert!(e.contains("no free page") && e.contains("slot 1"), "{e}");
    }
}
