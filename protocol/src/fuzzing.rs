//! Entry point shared by the cargo-fuzz target (`protocol/fuzz`) and the
//! property tests: feed arbitrary bytes to every decoder.

use crate::{
    Advert, Award, Bid, Cfp, Receipt, ResultAck, ResultClaim, ShardOutput, ShardResult, Signed, TaskSpec, Wire, Work,
};

/// Decodes `data` as every message kind, and verifies it where it decodes
/// as a signed envelope. Must never panic, whatever `data` holds; returns
/// how many kinds accepted it, so the work can't be optimised away.
pub fn decode_every_kind(data: &[u8]) -> usize {
    fn signed<T: crate::SignedKind>(data: &[u8]) -> usize {
        match Signed::<T>::decode(data) {
            Ok(envelope) => 1 + usize::from(envelope.verify().is_ok()),
            Err(_) => 0,
        }
    }
    [
        usize::from(Advert::decode(data).is_ok()),
        usize::from(Cfp::decode(data).is_ok()),
        usize::from(Bid::decode(data).is_ok()),
        usize::from(Award::decode(data).is_ok()),
        usize::from(ResultClaim::decode(data).is_ok()),
        usize::from(ShardOutput::decode(data).is_ok()),
        usize::from(ShardResult::decode(data).is_ok()),
        usize::from(ResultAck::decode(data).is_ok()),
        usize::from(TaskSpec::decode(data).is_ok()),
        usize::from(Work::decode(data).is_ok()),
        usize::from(Receipt::decode(data).is_ok()),
        usize::from(crate::rpc::Request::decode(data).is_ok()),
        usize::from(crate::rpc::Response::decode(data).is_ok()),
        signed::<Advert>(data),
        signed::<Cfp>(data),
        signed::<Bid>(data),
        signed::<Award>(data),
        signed::<ResultClaim>(data),
        signed::<ResultAck>(data),
        signed::<Receipt>(data),
    ]
    .iter()
    .sum()
}
