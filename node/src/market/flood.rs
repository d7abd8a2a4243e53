//! `--fault flood`: a peer that tries to drown the swarm, for testing its
//! defences. It publishes valid, signed calls for proposals for tasks that
//! do not exist (every worker serving the model would bid on each), and
//! sends every connected peer a stream of signed bids for tasks they never
//! asked about, as fast as the network takes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mycel_net::Handle;
use mycel_protocol::rpc::{Market, Request};
use mycel_protocol::{Bid, Cfp, Digest, Keypair, ModelKind, Price, ShardOffer, Signed, TaskId};
use tracing::warn;

use mycel_net::now_ms;

/// CFPs published per second, and requests in flight to each peer.
const CFPS_PER_SECOND: u64 = 200;
const REQUESTS_IN_FLIGHT: usize = 16;

/// Starts flooding in the background, for as long as the node runs.
pub(super) fn spawn(key: Keypair, net: Handle) {
    warn!("--fault flood: this node floods its peers with fake CFPs and bids");
    let sent = Arc::new(AtomicU64::new(0));
    let cfp_key = Keypair::from_secret_bytes(&key.secret_bytes());
    let gossip = net.clone();
    let counter = sent.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(1000 / CFPS_PER_SECOND));
        loop {
            tick.tick().await;
            let Some(model) = served_model(&gossip).await else { continue };
            n += 1;
            let cfp = Cfp {
                task: fake_task(b"cfp", n),
                round: 1,
                model,
                kind: ModelKind::Embedding,
                shards: vec![ShardOffer { shard: 0, items: 1, units: 1 }],
                max_price: None,
                bids_close_ms: now_ms() + 30_000,
                spot_commitment: Digest::of(b"flood"),
            };
            if let Ok(signed) = Signed::sign(&cfp_key, &cfp)
                && gossip.publish_cfp(&signed).await.is_ok()
            {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    for lane in 0..REQUESTS_IN_FLIGHT {
        let (net, key) = (net.clone(), Keypair::from_secret_bytes(&key.secret_bytes()));
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let peers = net.connected().await.unwrap_or_default();
                if peers.is_empty() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
                for peer in peers {
                    n += 1;
                    let bid = Bid {
                        task: fake_task(&(lane as u64).to_le_bytes(), n),
                        round: 1,
                        cfp: Digest::of(b"no such cfp"),
                        model: Digest::of(b"no such model"),
                        price: Price::default(),
                        queue_ms: 0,
                        units_per_s: 1.0,
                        capacity: 1,
                        expires_ms: now_ms() + 60_000,
                    };
                    let Ok(signed) = Signed::sign(&key, &bid) else { continue };
                    let _ = net.request(peer, Request::Market(Box::new(Market::Bid(signed)))).await;
                }
            }
        });
    }
}

/// The weights some peer serves: what a fake CFP asks for, so workers bid.
async fn served_model(net: &Handle) -> Option<Digest> {
    let peers = net.peers().await.ok()?;
    peers.iter().flat_map(|p| &p.advert.models).find(|m| m.kind == ModelKind::Embedding).map(|m| m.weights)
}

fn fake_task(salt: &[u8], n: u64) -> TaskId {
    let d = Digest::of_parts(&[b"mycel/flood", salt, &n.to_le_bytes()]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&d.0[..16]);
    TaskId(id)
}
