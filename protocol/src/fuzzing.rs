//! Entry points shared by the cargo-fuzz targets (`protocol/fuzz`, one per
//! kind of bytes a peer can send) and the property tests: feed arbitrary
//! bytes to a decoder, and where they decode, go on as the node does
//! (verify the envelope, decode and check what it carries). Each must never
//! panic, whatever `data` holds, and returns how many steps accepted it, so
//! the work can't be optimised away.

use crate::rpc::{Market, Request, Response};
use crate::{
    Advert, Award, Bid, Cfp, JobReceipt, Receipt, ResultAck, ResultClaim, ShardOutput, ShardResult, Signed,
    StagedReceipt, TaskSpec, Wire, Work,
};

fn plain<T: Wire>(data: &[u8]) -> usize {
    usize::from(T::decode(data).is_ok())
}

fn signed<T: crate::SignedKind>(data: &[u8]) -> usize {
    match Signed::<T>::decode(data) {
        Ok(envelope) => 1 + usize::from(envelope.verify().is_ok()),
        Err(_) => 0,
    }
}

/// A gossiped advert: the envelope, then the advert it signs.
pub fn advert(data: &[u8]) -> usize {
    plain::<Advert>(data) + signed::<Advert>(data)
}

/// A call for proposals (gossiped or sent directly).
pub fn cfp(data: &[u8]) -> usize {
    plain::<Cfp>(data) + signed::<Cfp>(data)
}

/// A bid.
pub fn bid(data: &[u8]) -> usize {
    plain::<Bid>(data) + signed::<Bid>(data)
}

/// An award, with the shards' inputs.
pub fn award(data: &[u8]) -> usize {
    plain::<Award>(data) + signed::<Award>(data)
}

/// A result acknowledgement.
pub fn ack(data: &[u8]) -> usize {
    plain::<ResultAck>(data) + signed::<ResultAck>(data)
}

/// A shard result: the output, the claim, and the claim's envelope checked
/// the way the requester takes it.
pub fn result(data: &[u8]) -> usize {
    let whole = match ShardResult::decode(data) {
        Ok(r) => {
            let digest = r.output.digest().is_ok();
            2 + usize::from(digest) + usize::from(r.into_verified().is_ok())
        }
        Err(_) => 0,
    };
    whole + plain::<ShardOutput>(data) + plain::<ResultClaim>(data) + signed::<ResultClaim>(data)
}

/// A receipt or a staged receipt, as `mycel verify` reads one from a file
/// anyone may have handed over: decoded, verified, every claim checked.
pub fn receipt(data: &[u8]) -> usize {
    let mut n = signed::<Receipt>(data) + signed::<StagedReceipt>(data) + signed::<JobReceipt>(data);
    if let Ok(r) = Receipt::decode(data) {
        n += 1 + usize::from(r.check_claims().is_ok());
    }
    if let Ok(tree) = StagedReceipt::decode(data) {
        n += 1 + usize::from(tree.check_tree(&crate::Keypair::from_secret_bytes(&[1; 32]).public(), None).is_ok());
    }
    if let Ok(job) = JobReceipt::decode(data) {
        n += 1 + usize::from(job.check_tree(&crate::Keypair::from_secret_bytes(&[1; 32]).public(), None).is_ok());
    }
    n
}

/// A task's spec and work, as a requester's API or a staged task's journal
/// hands them over.
pub fn task(data: &[u8]) -> usize {
    plain::<TaskSpec>(data) + plain::<Work>(data)
}

/// A whole request-response frame's payload, the way the node takes it:
/// decoded, then each market message's envelope verified and read.
pub fn request(data: &[u8]) -> usize {
    let Ok(request) = Request::decode(data) else { return 0 };
    1 + match request {
        Request::Adverts | Request::RouterOutcomes | Request::OwnAdvert => 0,
        Request::Market(m) => match *m {
            Market::Cfp(s) => usize::from(s.verify().is_ok()),
            Market::Bid(s) => usize::from(s.verify().is_ok()),
            Market::Award(s) => usize::from(s.verify().is_ok()),
            Market::Ack(s) => usize::from(s.verify().is_ok()),
            Market::Result(r) => usize::from(r.into_verified().is_ok()),
            _ => 0,
        },
    }
}

/// A response frame's payload (adverts a peer hands a newcomer, a
/// router's outcomes).
pub fn response(data: &[u8]) -> usize {
    match Response::decode(data) {
        Ok(Response::Adverts(adverts)) => 1 + adverts.iter().filter(|a| a.verify().is_ok()).count(),
        Ok(Response::RouterOutcomes(share)) => 1 + usize::from(share.verify().is_ok()),
        Ok(_) => 1,
        Err(_) => 0,
    }
}

/// Every decoder above, on the same bytes.
pub fn decode_every_kind(data: &[u8]) -> usize {
    [advert, cfp, bid, award, ack, result, receipt, task, request, response, router_outcomes]
        .iter()
        .map(|f| f(data))
        .sum()
}

/// Router outcomes another node shared (`POST /api/v1/router/import`).
pub fn router_outcomes(data: &[u8]) -> usize {
    plain::<crate::router::RouterOutcomes>(data) + signed::<crate::router::RouterOutcomes>(data)
}
