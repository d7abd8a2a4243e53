//! What a node's model router learned, signed to share with other nodes
//! (`GET /api/v1/router/export`, `POST /api/v1/router/import`).

use serde::{Deserialize, Serialize};

use crate::{Digest, limits};

/// One outcome: how well a model did on a prompt, by the prompt's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterOutcome {
    /// The model's weights digest.
    pub model: Digest,
    /// 0 (bad) to 1 (good).
    pub score: f32,
    /// The prompt's embedding (unit length), in the embedder's space.
    pub vector: Vec<f32>,
}

/// Outcomes learned in one embedding model's space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterOutcomes {
    /// The embedding model whose space the vectors are in.
    pub embedder: Digest,
    /// When they were exported, ms since the Unix epoch.
    pub created_ms: u64,
    /// The outcomes, at most [`limits::ROUTER_OUTCOMES`].
    pub outcomes: Vec<RouterOutcome>,
}

impl RouterOutcomes {
    /// The most outcomes of `dimensions`-wide vectors one direct response
    /// carries ([`limits::RPC_RESPONSE`], with room for the envelope).
    pub fn most_in_a_response(dimensions: usize) -> usize {
        let each = dimensions * 4 + std::mem::size_of::<crate::Digest>() + 16;
        ((limits::RPC_RESPONSE - 64 * 1024) / each).min(limits::ROUTER_OUTCOMES)
    }

    fn check(&self) -> Result<(), String> {
        if self.outcomes.len() > limits::ROUTER_OUTCOMES {
            return Err(format!("{} outcomes, at most {}", self.outcomes.len(), limits::ROUTER_OUTCOMES));
        }
        let dims = self.outcomes.first().map_or(0, |o| o.vector.len());
        if dims > limits::ROUTER_DIMENSIONS {
            return Err(format!("vectors of {dims} dimensions, at most {}", limits::ROUTER_DIMENSIONS));
        }
        for o in &self.outcomes {
            if !(0.0..=1.0).contains(&o.score) {
                return Err(format!("score {} not in 0..=1", o.score));
            }
            if o.vector.len() != dims || dims == 0 || o.vector.iter().any(|x| !x.is_finite()) {
                return Err("vectors must all have the same width and finite values".into());
            }
        }
        Ok(())
    }
}

crate::wire!(RouterOutcomes, limits::ROUTER_SHARE, validate = RouterOutcomes::check);

impl crate::SignedKind for RouterOutcomes {
    const DOMAIN: &'static str = "mycel/router-outcomes/1";
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Keypair, Signed, Wire};

    fn outcomes(n: usize, dims: usize) -> RouterOutcomes {
        RouterOutcomes {
            embedder: Digest::of(b"e"),
            created_ms: 1,
            outcomes: (0..n)
                .map(|i| RouterOutcome { model: Digest::of(b"m"), score: 0.5, vector: vec![i as f32; dims] })
                .collect(),
        }
    }

    #[test]
    fn the_most_a_response_carries_fits_in_one() {
        let key = Keypair::generate().unwrap();
        for dims in [384, limits::ROUTER_DIMENSIONS] {
            let n = RouterOutcomes::most_in_a_response(dims);
            assert!(n >= 512, "{dims} dimensions: {n}");
            let share = Signed::sign(&key, &outcomes(n, dims)).unwrap();
            let response = crate::rpc::Response::RouterOutcomes(Box::new(share));
            let bytes = response.encode().unwrap();
            assert!(bytes.len() <= limits::RPC_RESPONSE, "{dims}: {} bytes", bytes.len());
            assert_eq!(crate::rpc::Response::decode(&bytes).unwrap(), response);
        }
    }

    #[test]
    fn the_largest_allowed_share_fits_and_bad_ones_are_refused() {
        let key = Keypair::generate().unwrap();
        let big = outcomes(limits::ROUTER_OUTCOMES, limits::ROUTER_DIMENSIONS);
        let signed = Signed::sign(&key, &big).unwrap();
        let back = Signed::<RouterOutcomes>::decode(&signed.encode().unwrap()).unwrap();
        assert_eq!(back.verify().unwrap(), big);
        let mut bad = outcomes(2, 4);
        bad.outcomes[1].score = 2.0;
        assert!(RouterOutcomes::decode(&bad.encode().unwrap()).is_err());
        let mut ragged = outcomes(2, 4);
        ragged.outcomes[1].vector.pop();
        assert!(RouterOutcomes::decode(&ragged.encode().unwrap()).is_err());
        assert!(RouterOutcomes::decode(&outcomes(limits::ROUTER_OUTCOMES + 1, 1).encode().unwrap()).is_err());
    }
}
