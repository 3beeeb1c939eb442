//! Progress trees: the one place where an operation's overall completion is
//! computed.
//!
//! A tree's nodes carry a *weight* relative to their siblings (set from a
//! measured property: bytes to move, expected seconds from a measured
//! throughput) and leaves carry a *fraction* done in `[0, 1]`. A node's
//! fraction is the weighted mean of its children's; the overall figure is
//! the root's.
//!
//! Two rules make the figure honest:
//! - it never goes backwards: weights may be re-measured while work runs and
//!   a leaf may be told a smaller fraction (a QEMU job whose length grew), so
//!   the *reported* figure is the running maximum of the computed one, and a
//!   leaf keeps the largest fraction it was given;
//! - 100 % means done: until [`ProgressTree::complete`] is called the
//!   reported figure stops just short of 1.

use std::time::{Duration, Instant};

pub use ferry_api::progress::{Node, NodeId, ProgressView};

/// The highest figure reported before the operation is complete.
const BELOW_DONE: f64 = 0.999;

/// A progress tree with its reported (monotonic) figure.
#[derive(Debug, Clone)]
pub struct ProgressTree {
    nodes: Vec<Node>,
    reported: f64,
    complete: bool,
    started: Instant,
    /// When each node was started ([`ProgressTree::start`]) and finished,
    /// for the time a step took ([`ProgressTree::took`]).
    times: Vec<(Option<Instant>, Option<Instant>)>,
}

impl ProgressTree {
    /// A tree with only its root (node 0), a leaf until children are added.
    pub fn new(root: impl Into<String>) -> Self {
        ProgressTree {
            nodes: vec![Node {
                id: 0,
                parent: None,
                name: root.into(),
                weight: 1.0,
                fraction: 0.0,
                children: Vec::new(),
            }],
            reported: 0.0,
            complete: false,
            started: Instant::now(),
            times: vec![(None, None)],
        }
    }

    pub const ROOT: NodeId = 0;

    /// Adds a child of `parent` with `weight` relative to its siblings.
    ///
    /// # Panics
    /// If `parent` is not a node of this tree.
    pub fn add(&mut self, parent: NodeId, name: impl Into<String>, weight: f64) -> NodeId {
        assert!(parent < self.nodes.len(), "no progress node {parent}");
        let id = self.nodes.len();
        self.nodes.push(Node {
            id,
            parent: Some(parent),
            name: name.into(),
            weight: sanitize(weight),
            fraction: 0.0,
            children: Vec::new(),
        });
        self.nodes[parent].children.push(id);
        self.times.push((None, None));
        self.refresh();
        id
    }

    /// Notes that the work of a node starts now (the manager calls it for
    /// each step), so that [`ProgressTree::took`] can tell its duration.
    pub fn start(&mut self, id: NodeId) {
        if let Some(t) = self.times.get_mut(id) {
            *t = (Some(Instant::now()), None);
        }
    }

    /// How long a node took from [`ProgressTree::start`] to
    /// [`ProgressTree::finish`]; `None` unless both happened in this
    /// process. Lets an operation weigh its short fixed steps by their
    /// measured time.
    pub fn took(&self, id: NodeId) -> Option<Duration> {
        match self.times.get(id)? {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(*a)),
            _ => None,
        }
    }

    /// Time since the tree was made (the operation's start in this run).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Re-measures a node's weight. The reported figure does not move back.
    pub fn set_weight(&mut self, id: NodeId, weight: f64) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.weight = sanitize(weight);
            self.refresh();
        }
    }

    /// Sets a leaf's fraction done; a smaller value than before is ignored.
    pub fn set_fraction(&mut self, id: NodeId, fraction: f64) {
        if let Some(n) = self.nodes.get_mut(id) {
            let f = sanitize(fraction).min(1.0);
            if f > n.fraction {
                n.fraction = f;
                self.refresh();
            }
        }
    }

    /// Marks a node and everything below it done.
    pub fn finish(&mut self, id: NodeId) {
        if let Some((Some(_), end @ None)) = self.times.get_mut(id) {
            *end = Some(Instant::now());
        }
        let mut stack = vec![id];
        while let Some(i) = stack.pop() {
            if let Some(n) = self.nodes.get_mut(i) {
                n.fraction = 1.0;
                stack.extend(n.children.iter().copied());
            }
        }
        self.refresh();
    }

    /// The operation is done (and verified): the figure becomes 100 %.
    pub fn complete(&mut self) {
        self.finish(Self::ROOT);
        self.complete = true;
        self.reported = 1.0;
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// Looks a node up by its path of names below the root.
    pub fn find(&self, path: &[&str]) -> Option<NodeId> {
        let mut at = Self::ROOT;
        for name in path {
            at = *self.nodes[at]
                .children
                .iter()
                .find(|c| self.nodes[**c].name == *name)?;
        }
        Some(at)
    }

    /// The computed fraction of a node (weighted mean of its children).
    pub fn fraction(&self, id: NodeId) -> f64 {
        let n = &self.nodes[id];
        if n.children.is_empty() {
            return n.fraction;
        }
        let total: f64 = n.children.iter().map(|c| self.nodes[*c].weight).sum();
        if total <= 0.0 {
            // No child has a measured weight yet: count them alike.
            let k = n.children.len() as f64;
            return n.children.iter().map(|c| self.fraction(*c)).sum::<f64>() / k;
        }
        n.children
            .iter()
            .map(|c| self.nodes[*c].weight * self.fraction(*c))
            .sum::<f64>()
            / total
    }

    /// The reported overall figure: monotonic, 1 only when complete.
    pub fn overall(&self) -> f64 {
        self.reported
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    fn refresh(&mut self) {
        if self.complete {
            return;
        }
        let computed = self.fraction(Self::ROOT).min(BELOW_DONE);
        if computed > self.reported {
            self.reported = computed;
        }
    }

    pub fn view(&self) -> ProgressView {
        let elapsed = self.started.elapsed();
        let nodes = self
            .nodes
            .iter()
            .map(|n| Node {
                fraction: self.fraction(n.id),
                ..n.clone()
            })
            .collect();
        let eta_ms = if self.complete {
            Some(0)
        } else if self.reported > 0.0 {
            let left = elapsed.as_secs_f64() * (1.0 - self.reported) / self.reported;
            Some(Duration::from_secs_f64(left).as_millis() as u64)
        } else {
            None
        };
        ProgressView {
            overall: self.reported,
            complete: self.complete,
            elapsed_ms: elapsed.as_millis() as u64,
            eta_ms,
            nodes,
        }
    }
}

fn sanitize(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weighted_mean_of_leaves() {
        let mut t = ProgressTree::new("copy vm");
        let big = t.add(ProgressTree::ROOT, "disk0", 3.0);
        let small = t.add(ProgressTree::ROOT, "disk1", 1.0);
        t.set_fraction(big, 0.5);
        assert!((t.overall() - 0.375).abs() < 1e-9);
        t.set_fraction(small, 1.0);
        assert!((t.overall() - 0.625).abs() < 1e-9);
        assert_eq!(t.find(&["disk1"]), Some(small));
    }

    #[test]
    fn never_reaches_one_before_complete() {
        let mut t = ProgressTree::new("op");
        let a = t.add(ProgressTree::ROOT, "a", 1.0);
        t.set_fraction(a, 1.0);
        assert!(t.overall() < 1.0);
        assert!(!t.view().complete);
        t.complete();
        assert_eq!(t.overall(), 1.0);
        assert_eq!(t.view().eta_ms, Some(0));
    }

    #[test]
    fn reweighting_does_not_move_back() {
        let mut t = ProgressTree::new("op");
        let a = t.add(ProgressTree::ROOT, "transfer", 1.0);
        let b = t.add(ProgressTree::ROOT, "verify", 1.0);
        t.set_fraction(a, 1.0);
        let before = t.overall();
        t.set_weight(b, 10.0);
        assert!(t.overall() >= before);
        assert!(t.fraction(ProgressTree::ROOT) < before);
    }

    #[test]
    fn unweighted_children_count_alike() {
        let mut t = ProgressTree::new("op");
        let a = t.add(ProgressTree::ROOT, "a", 0.0);
        t.add(ProgressTree::ROOT, "b", f64::NAN);
        t.set_fraction(a, 1.0);
        assert!((t.overall() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn finish_marks_a_subtree_done() {
        let mut t = ProgressTree::new("op");
        let disk = t.add(ProgressTree::ROOT, "disk", 1.0);
        t.add(disk, "transfer", 2.0);
        t.add(disk, "verify", 1.0);
        t.add(ProgressTree::ROOT, "other", 1.0);
        t.finish(disk);
        assert!((t.overall() - 0.5).abs() < 1e-9);
        let v = t.view();
        assert_eq!(v.nodes[disk].fraction, 1.0);
    }

    #[test]
    fn took_is_known_once_started_and_finished() {
        let mut t = ProgressTree::new("op");
        let a = t.add(ProgressTree::ROOT, "a", 0.0);
        let b = t.add(ProgressTree::ROOT, "b", 0.0);
        assert_eq!(t.took(a), None);
        t.start(a);
        assert_eq!(t.took(a), None);
        std::thread::sleep(Duration::from_millis(2));
        t.finish(a);
        let took = t.took(a).unwrap();
        assert!(took >= Duration::from_millis(2), "{took:?}");
        // A later finish (say, of the whole tree) does not move it.
        t.finish(ProgressTree::ROOT);
        assert_eq!(t.took(a), Some(took));
        // Finished without a start (a step done before a restart): unknown.
        t.finish(b);
        assert_eq!(t.took(b), None);
    }

    #[derive(Debug, Clone)]
    enum Act {
        Add(usize, f64),
        Weight(usize, f64),
        Fraction(usize, f64),
        Finish(usize),
    }

    fn act() -> impl Strategy<Value = Act> {
        prop_oneof![
            (0usize..16, 0.0f64..100.0).prop_map(|(p, w)| Act::Add(p, w)),
            (0usize..16, -1.0f64..100.0).prop_map(|(n, w)| Act::Weight(n, w)),
            (0usize..16, -0.5f64..1.5).prop_map(|(n, f)| Act::Fraction(n, f)),
            (0usize..16).prop_map(Act::Finish),
        ]
    }

    proptest! {
        /// Whatever happens to weights and fractions, the reported figure
        /// stays in [0, 1), never decreases, and is 1 after complete().
        #[test]
        fn reported_is_monotonic(acts in proptest::collection::vec(act(), 1..60)) {
            let mut t = ProgressTree::new("op");
            let mut last = 0.0;
            for a in acts {
                let n = t.nodes.len();
                match a {
                    Act::Add(p, w) => { t.add(p % n, "n", w); }
                    Act::Weight(i, w) => t.set_weight(i % n, w),
                    Act::Fraction(i, f) => t.set_fraction(i % n, f),
                    Act::Finish(i) => t.finish(i % n),
                }
                let now = t.overall();
                prop_assert!(now >= last, "went back from {last} to {now}");
                prop_assert!((0.0..1.0).contains(&now));
                last = now;
            }
            t.complete();
            prop_assert_eq!(t.overall(), 1.0);
        }
    }
}
