//! The progress of an operation as the API shows it. Computed by
//! `ferry-ops`' progress tree; only the view lives here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Index of a node in its tree.
pub type NodeId = usize;

/// One node of a progress tree.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct Node {
    pub id: NodeId,
    pub parent: Option<NodeId>,
    pub name: String,
    /// Weight relative to the node's siblings (non-negative).
    pub weight: f64,
    /// Fraction done in `[0, 1]` (for inner nodes: the weighted mean of
    /// their children).
    pub fraction: f64,
    pub children: Vec<NodeId>,
}

/// The whole tree with the overall figure and an estimate of the time left.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct ProgressView {
    /// Overall completion in `[0, 1]`: never decreases, 1 only when done.
    pub overall: f64,
    pub complete: bool,
    pub elapsed_ms: u64,
    /// Estimated milliseconds left (none before any progress).
    pub eta_ms: Option<u64>,
    pub nodes: Vec<Node>,
}

impl ProgressView {
    /// The name of the deepest unfinished node on the path the work is
    /// following (the "current step" shown beside a progress bar).
    pub fn current(&self) -> Option<&str> {
        let mut at = self.nodes.first()?;
        loop {
            let next = at
                .children
                .iter()
                .filter_map(|c| self.nodes.get(*c))
                .find(|n| n.fraction < 1.0);
            match next {
                Some(n) => at = n,
                None => return if at.id == 0 { None } else { Some(&at.name) },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: usize, parent: Option<usize>, name: &str, f: f64, children: Vec<usize>) -> Node {
        Node {
            id,
            parent,
            name: name.into(),
            weight: 1.0,
            fraction: f,
            children,
        }
    }

    #[test]
    fn current_is_the_deepest_unfinished_node() {
        let v = ProgressView {
            overall: 0.5,
            complete: false,
            elapsed_ms: 1,
            eta_ms: None,
            nodes: vec![
                node(0, None, "op", 0.5, vec![1, 2]),
                node(1, Some(0), "first", 1.0, vec![]),
                node(2, Some(0), "second", 0.0, vec![3]),
                node(3, Some(2), "transfer", 0.0, vec![]),
            ],
        };
        assert_eq!(v.current(), Some("transfer"));
    }
}
