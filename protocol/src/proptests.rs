//! Property tests for every wire type: valid values round-trip, invalid or
//! oversized ones are refused, truncated bytes are errors, mutated bytes
//! never panic, and signed envelopes never verify once touched.

use std::fmt::Debug;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::advert::ModelKey;
use crate::signed::VerifyError;
use crate::*;

/// The core property of a [`Wire`] type, for one value.
fn check_wire<T: Wire + PartialEq + Debug>(value: &T, mutate_at: usize, mutate_xor: u8) -> Result<(), TestCaseError> {
    // Raw bincode, bypassing `encode`'s size cap, to see what a peer that
    // ignores our rules could send.
    let raw = bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("in-memory encode");
    let acceptable = value.validate().is_ok() && raw.len() <= T::MAX_SIZE;
    match T::decode(&raw) {
        Ok(back) => {
            prop_assert!(acceptable, "decoded a value that breaks the rules: {:?}", value.validate());
            prop_assert_eq!(&back, value);
            prop_assert_eq!(value.encode().expect("acceptable value encodes"), raw.clone());
        }
        Err(e) => prop_assert!(!acceptable, "refused a valid value: {e}"),
    }

    // Every strict prefix of a complete encoding is an error.
    let step = (raw.len() / 64).max(1);
    for cut in (0..raw.len()).step_by(step) {
        prop_assert!(T::decode(&raw[..cut]).is_err(), "prefix of {} bytes decoded", cut);
    }

    // A flipped byte either fails or decodes to something; never panics.
    if !raw.is_empty() && mutate_xor != 0 {
        let mut mutated = raw.clone();
        mutated[mutate_at % raw.len()] ^= mutate_xor;
        let _ = T::decode(&mutated);
    }
    Ok(())
}

/// Signing and tamper properties for a signed kind.
fn check_signed<T: SignedKind + PartialEq + Debug>(
    seed: [u8; 32],
    value: &T,
    mutate_at: usize,
    mutate_xor: u8,
) -> Result<(), TestCaseError> {
    let key = Keypair::from_secret_bytes(&seed);
    let Ok(signed) = Signed::sign(&key, value) else {
        // Too large to encode: nothing to sign, and `check_wire` covers it.
        return Ok(());
    };
    if value.validate().is_err() {
        let refused = matches!(signed.verify(), Err(VerifyError::Payload(_)));
        prop_assert!(refused);
        return Ok(());
    }
    let bytes = signed.encode().expect("envelope fits");
    let decoded = Signed::<T>::decode(&bytes).expect("own envelope decodes");
    prop_assert_eq!(&decoded.verify().expect("own signature verifies"), value);
    prop_assert_eq!(&decoded.verify_from(&key.public()).expect("right signer"), value);

    let other = Keypair::from_secret_bytes(&[seed[0].wrapping_add(1); 32]);
    let wrong_signer = matches!(decoded.verify_from(&other.public()), Err(VerifyError::WrongSigner { .. }));
    prop_assert!(wrong_signer);

    if mutate_xor != 0 {
        let mut mutated = bytes.clone();
        mutated[mutate_at % bytes.len()] ^= mutate_xor;
        if let Ok(envelope) = Signed::<T>::decode(&mutated) {
            prop_assert!(envelope.verify().is_err(), "a modified envelope still verifies");
        }
    }
    Ok(())
}

/// Strategies for types holding keys or signatures, which can't derive
/// `Arbitrary` (not every 32 bytes is a public key).
fn signed_claims() -> impl Strategy<Value = Vec<Signed<ResultClaim>>> {
    prop::collection::vec((any::<[u8; 32]>(), any::<ResultClaim>()), 0..4).prop_map(|claims| {
        claims
            .into_iter()
            .map(|(seed, claim)| Signed::sign(&Keypair::from_secret_bytes(&seed), &claim).expect("claims are small"))
            .collect()
    })
}

fn receipts() -> impl Strategy<Value = Receipt> {
    (any::<TaskId>(), any::<[Digest; 4]>(), signed_claims(), any::<(u64, [u8; 32], u16)>()).prop_map(
        |(task, [spec, model, root, output], shards, (completed_ms, secret, permille))| Receipt {
            task,
            spec,
            model,
            shards,
            root,
            output,
            completed_ms,
            spot: crate::spot::Reveal { secret, permille },
        },
    )
}

fn rpc_requests() -> impl Strategy<Value = rpc::Request> {
    Just(rpc::Request::Adverts)
}

fn rpc_responses() -> impl Strategy<Value = rpc::Response> {
    prop_oneof![
        prop::collection::vec((any::<[u8; 32]>(), valid::advert()), 0..4).prop_map(|adverts| {
            rpc::Response::Adverts(
                adverts
                    .into_iter()
                    .map(|(seed, a)| Signed::sign(&Keypair::from_secret_bytes(&seed), &a).expect("small advert"))
                    .collect(),
            )
        }),
        ".{0,300}".prop_map(rpc::Response::Refused),
    ]
}

fn shard_results() -> impl Strategy<Value = ShardResult> {
    (signed_claims(), prop_oneof![valid::shard_output(), any::<ShardOutput>()])
        .prop_filter_map("needs a claim", |(mut claims, output)| Some(ShardResult { claim: claims.pop()?, output }))
}

/// Strategies for values that obey every protocol rule, so round trips are
/// exercised as well as refusals (derived `Arbitrary` values mostly break
/// some rule: too many entries, NaN...).
mod valid {
    use super::*;

    fn text(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!(".{{0,{max}}}")).expect("valid regex")
    }

    fn rate() -> impl Strategy<Value = f32> {
        0f32..1e6
    }

    pub fn model() -> impl Strategy<Value = ModelAdvert> {
        let profile = (text(30), prop::collection::vec(text(6), 0..6))
            .prop_map(|(description, tags)| ModelProfile { description, tags });
        (text(32), any::<ModelKind>(), any::<Digest>(), any::<u32>(), any::<u32>(), (rate(), rate(), rate()), profile)
            .prop_map(|(id, kind, weights, dimensions, context, (e, p, d), profile)| ModelAdvert {
                id,
                kind,
                weights,
                dimensions,
                context,
                quantization: Quantization::Q4_1,
                throughput: Throughput { embeddings_per_s: e, prefill_tokens_per_s: p, decode_tokens_per_s: d },
                profile,
                tools: kind == ModelKind::Generation,
            })
    }

    pub fn advert() -> impl Strategy<Value = Advert> {
        let hardware = (text(40), any::<u32>(), prop::collection::vec(text(8), 0..6), any::<u64>()).prop_map(
            |(cpu_model, cores, simd, memory_bytes)| Hardware { cpu_model, cores, simd, memory_bytes, gpus: vec![] },
        );
        (
            any::<(u64, u64)>(),
            text(16),
            prop::collection::vec(model(), 0..4),
            hardware,
            any::<(Load, Price)>(),
            prop::collection::vec(text(40), 0..4),
        )
            .prop_map(|((seq, timestamp_ms), software, models, hardware, (load, price), listen_addrs)| {
                Advert { seq, timestamp_ms, software, models, hardware, load, price, listen_addrs }
            })
    }

    fn params() -> impl Strategy<Value = GenerateParams> {
        (1..=limits::MAX_TOKENS, 0f32..2.0, 1u32..=100, any::<(u64, bool)>(), prop::collection::vec(text(8), 0..3))
            .prop_map(|(max_tokens, temperature, top_p, (seed, stream), stop)| GenerateParams {
                max_tokens,
                temperature,
                top_p: top_p as f32 / 100.0,
                seed,
                stop,
                stream,
                ..GenerateParams::default()
            })
    }

    fn chat_turn() -> impl Strategy<Value = ChatTurn> {
        (any::<Role>(), text(40)).prop_map(|(role, content)| ChatTurn::new(role, content))
    }

    pub fn work() -> impl Strategy<Value = Work> {
        prop_oneof![
            prop::collection::vec(text(40), 1..8).prop_map(|texts| Work::Embed { texts }),
            (prop::collection::vec(text(40), 1..4), params())
                .prop_map(|(prompts, params)| Work::Generate { prompts, params }),
            (prop::collection::vec(prop::collection::vec(chat_turn(), 1..4), 1..3), params())
                .prop_map(|(conversations, params)| Work::Chat { conversations, params }),
        ]
    }

    pub fn task_spec() -> impl Strategy<Value = TaskSpec> {
        let model =
            prop_oneof![any::<Digest>().prop_map(ModelSelector::Digest), text(32).prop_map(ModelSelector::Name)];
        let split = prop_oneof![Just(Split::Auto), (1u32..10_000).prop_map(Split::ItemsPerShard)];
        (work(), model, split, 1..=limits::MAX_REDUNDANCY, 0u16..=1000, any::<(u64, Option<u64>)>()).prop_map(
            |(work, model, split, redundancy, spot_check_permille, (deadline_ms, budget_micros))| TaskSpec {
                work,
                model,
                split,
                redundancy,
                spot_check_permille,
                aggregation: Aggregation::Concat,
                deadline_ms,
                budget_micros,
            },
        )
    }

    pub fn award() -> impl Strategy<Value = Award> {
        let shard = (any::<(u32, u64, u64)>(), work())
            .prop_map(|((shard, first_item, deadline_ms), work)| AwardedShard { shard, first_item, work, deadline_ms });
        (any::<(TaskId, u32, Digest, Digest)>(), prop::collection::vec(shard, 0..4))
            .prop_map(|((task, round, bid, model), shards)| Award { task, round, bid, model, shards })
    }

    pub fn bid() -> impl Strategy<Value = Bid> {
        (any::<Bid>(), rate(), 0..=limits::MAX_QUEUE_MS, 0..=limits::MAX_CAPACITY)
            .prop_map(|(bid, units_per_s, queue_ms, capacity)| Bid { units_per_s, queue_ms, capacity, ..bid })
    }

    pub fn shard_output() -> impl Strategy<Value = ShardOutput> {
        (1u32..8, 0usize..6)
            .prop_flat_map(|(dims, n)| {
                prop::collection::vec(-1f32..1.0, dims as usize * n)
                    .prop_map(move |values| ShardOutput::Embeddings { dimensions: dims, values })
            })
            .boxed()
    }
}

/// One proptest per wire type, all checking the same properties.
macro_rules! wire_props {
    ($($name:ident: $ty:ty = $strategy:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(value in $strategy, at in any::<usize>(), xor in any::<u8>()) {
                    check_wire::<$ty>(&value, at, xor)?;
                }
            )*
        }
    };
}

wire_props! {
    advert_wire: Advert = prop_oneof![valid::advert(), any::<Advert>()];
    cfp_wire: Cfp = any::<Cfp>();
    bid_wire: Bid = prop_oneof![valid::bid(), any::<Bid>()];
    award_wire: Award = prop_oneof![valid::award(), any::<Award>()];
    result_claim_wire: ResultClaim = any::<ResultClaim>();
    shard_output_wire: ShardOutput = prop_oneof![valid::shard_output(), any::<ShardOutput>()];
    shard_result_wire: ShardResult = shard_results();
    result_ack_wire: ResultAck = any::<ResultAck>();
    task_spec_wire: TaskSpec = prop_oneof![valid::task_spec(), any::<TaskSpec>()];
    work_wire: Work = prop_oneof![valid::work(), any::<Work>()];
    receipt_wire: Receipt = receipts();
    rpc_request_wire: rpc::Request = rpc_requests();
    rpc_response_wire: rpc::Response = rpc_responses();
}

macro_rules! signed_props {
    ($($name:ident: $ty:ty = $strategy:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(seed in any::<[u8; 32]>(), value in $strategy, at in any::<usize>(), xor in any::<u8>()) {
                    check_signed::<$ty>(seed, &value, at, xor)?;
                }
            )*
        }
    };
}

signed_props! {
    advert_signed: Advert = prop_oneof![valid::advert(), any::<Advert>()];
    cfp_signed: Cfp = any::<Cfp>();
    bid_signed: Bid = prop_oneof![valid::bid(), any::<Bid>()];
    award_signed: Award = prop_oneof![valid::award(), any::<Award>()];
    result_claim_signed: ResultClaim = any::<ResultClaim>();
    result_ack_signed: ResultAck = any::<ResultAck>();
    receipt_signed: Receipt = receipts();
}

proptest! {
    /// What a requester names (weights in hex, an id in any case, an id
    /// after an organisation's `/`) finds the model, under the same DHT
    /// record as the worker announced; other weights never match.
    #[test]
    fn a_model_is_found_by_every_name_a_request_gives_it(m in valid::model(), other in valid::model()) {
        for key in ModelKey::of(&m) {
            prop_assert!(key.matches(&m));
        }
        let by_weights = ModelKey::named(&m.weights.to_hex());
        prop_assert!(by_weights.matches(&m));
        prop_assert_eq!(by_weights.record_key(), ModelKey::Weights(m.weights).record_key());
        if !m.id.contains('/') && Digest::from_hex(&m.id).is_err() {
            for name in [m.id.to_ascii_uppercase(), format!("HuggingFaceTB/{}", m.id)] {
                let key = ModelKey::named(&name);
                prop_assert!(key.matches(&m), "{name} does not find {}", m.id);
                prop_assert_eq!(key.record_key(), ModelKey::Id(m.id.clone()).record_key());
            }
        }
        if other.weights != m.weights {
            prop_assert!(!ModelKey::Weights(m.weights).matches(&other));
        }
        prop_assert_eq!(ModelKey::Kind(m.kind).matches(&other), m.kind == other.kind);
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(data in prop::collection::vec(any::<u8>(), 0..512)) {
        crate::fuzzing::decode_every_kind(&data);
    }
}

/// A signature made for one kind, presented as every other kind, fails the
/// signature check, even where the payload bytes happen to decode.
#[test]
fn cross_kind_replay_is_rejected() {
    let key = Keypair::from_secret_bytes(&[7; 32]);
    let ack = ResultAck { task: TaskId([1; 16]), shard: 3, claim: Digest::of(b"c"), verdict: Verdict::Accepted };
    let bytes = Signed::sign(&key, &ack).unwrap().encode().unwrap();
    assert!(Signed::<ResultAck>::decode(&bytes).unwrap().verify().is_ok());

    fn replay<T: SignedKind>(bytes: &[u8]) -> Result<T, VerifyError> {
        Signed::<T>::decode(bytes)?.verify()
    }
    assert!(matches!(replay::<Bid>(&bytes), Err(VerifyError::BadSignature { .. })));
    assert!(matches!(replay::<Cfp>(&bytes), Err(VerifyError::BadSignature { .. })));
    assert!(matches!(replay::<Award>(&bytes), Err(VerifyError::BadSignature { .. })));
    assert!(matches!(replay::<ResultClaim>(&bytes), Err(VerifyError::BadSignature { .. })));
    assert!(matches!(replay::<Advert>(&bytes), Err(VerifyError::BadSignature { .. })));
    assert!(matches!(replay::<Receipt>(&bytes), Err(VerifyError::BadSignature { .. })));
}

/// The domain alone keeps kinds apart: a valid signature by the right key
/// over the very same payload bytes, made under the bid domain, does not
/// verify as an ack.
#[test]
fn same_payload_signed_under_another_domain_fails() {
    let key = Keypair::from_secret_bytes(&[9; 32]);
    let ack = ResultAck { task: TaskId([2; 16]), shard: 1, claim: Digest::of(b"x"), verdict: Verdict::Accepted };
    let payload = ack.encode().unwrap();
    let bid_signature = key.sign_raw(&[<Bid as SignedKind>::DOMAIN.as_bytes(), &[0], &payload].concat());

    // Envelope layout on the wire: signer (32), signature (64), payload.
    let mut bytes = Signed::sign(&key, &ack).unwrap().encode().unwrap();
    bytes[32..96].copy_from_slice(&bid_signature.0);
    let envelope = Signed::<ResultAck>::decode(&bytes).unwrap();
    assert_eq!(envelope.payload(), payload.as_slice());
    assert!(matches!(envelope.verify(), Err(VerifyError::BadSignature { .. })));
}

#[test]
fn tampered_payload_is_rejected() {
    let key = Keypair::from_secret_bytes(&[3; 32]);
    let bid = Bid {
        task: TaskId([5; 16]),
        round: 0,
        cfp: Digest::of(b"cfp"),
        model: Digest::of(b"model"),
        price: Price { micros_per_unit: 10 },
        queue_ms: 0,
        units_per_s: 100.0,
        capacity: 2,
        expires_ms: 1,
    };
    let mut bytes = Signed::sign(&key, &bid).unwrap().encode().unwrap();
    let last = bytes.len() - 1; // inside the payload: expires_ms
    bytes[last] ^= 1;
    let envelope = Signed::<Bid>::decode(&bytes).unwrap();
    assert!(matches!(envelope.verify(), Err(VerifyError::BadSignature { .. })));
}

/// Numbers a peer sends that the market computes with are bounded at
/// decode: a bid claiming a queue of `u64::MAX` ms (which once overflowed
/// the requester's deadline sum) never reaches it.
#[test]
fn out_of_range_bid_numbers_are_refused_at_decode() {
    let key = Keypair::from_secret_bytes(&[3; 32]);
    let bid = Bid {
        task: TaskId([5; 16]),
        round: 1,
        cfp: Digest::of(b"cfp"),
        model: Digest::of(b"model"),
        price: Price { micros_per_unit: 10 },
        queue_ms: limits::MAX_QUEUE_MS,
        units_per_s: limits::MAX_UNITS_PER_S,
        capacity: limits::MAX_CAPACITY,
        expires_ms: 1,
    };
    assert!(Signed::sign(&key, &bid).unwrap().verify().is_ok(), "the limits themselves are allowed");
    for bad in [
        Bid { queue_ms: u64::MAX, ..bid.clone() },
        Bid { queue_ms: limits::MAX_QUEUE_MS + 1, ..bid.clone() },
        Bid { units_per_s: 1.0e30, ..bid.clone() },
        Bid { units_per_s: f32::INFINITY, ..bid.clone() },
        Bid { capacity: u32::MAX, ..bid.clone() },
    ] {
        let raw = bincode::serde::encode_to_vec(&bad, bincode::config::standard()).unwrap();
        assert!(matches!(Bid::decode(&raw), Err(DecodeError::Invalid { .. })), "{bad:?}");
    }
}

#[test]
fn oversized_frames_are_rejected_before_decoding() {
    let frame = vec![0u8; Signed::<Bid>::MAX_SIZE + 1];
    assert!(matches!(Signed::<Bid>::decode(&frame), Err(DecodeError::TooLarge { .. })));
    let frame = vec![0u8; limits::ADVERT + 1];
    assert!(matches!(Advert::decode(&frame), Err(DecodeError::TooLarge { .. })));

    // An envelope within the envelope cap whose payload exceeds the kind's.
    let key = Keypair::from_secret_bytes(&[4; 32]);
    let ack = ResultAck { task: TaskId([0; 16]), shard: 0, claim: Digest::default(), verdict: Verdict::Accepted };
    let envelope = Signed::sign(&key, &ack).unwrap();
    let mut bytes = envelope.encode().unwrap();
    let header = 32 + 64;
    let payload_len = envelope.payload().len();
    bytes.truncate(header);
    // varint length: 251 marks a u16 follows.
    let big = (limits::RESULT_ACK + 50) as u16;
    bytes.push(251);
    bytes.extend_from_slice(&big.to_le_bytes());
    bytes.extend(std::iter::repeat_n(0u8, big as usize));
    assert!(payload_len < big as usize);
    assert!(matches!(Signed::<ResultAck>::decode(&bytes), Err(DecodeError::TooLarge { .. })));
}

/// Guards the strategies above: if they stop producing valid values, the
/// round-trip half of every property silently stops being tested.
#[test]
fn strategies_produce_mostly_valid_values() {
    use proptest::strategy::ValueTree;
    fn accepted<T: Wire + Debug>(strategy: impl Strategy<Value = T>) -> usize {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        (0..100)
            .filter(|_| {
                let v = strategy.new_tree(&mut runner).expect("strategy").current();
                let raw = bincode::serde::encode_to_vec(&v, bincode::config::standard()).expect("encode");
                T::decode(&raw).is_ok()
            })
            .count()
    }
    assert!(accepted(valid::advert()) >= 95);
    assert!(accepted(valid::task_spec()) >= 95);
    assert!(accepted(valid::award()) >= 95);
    assert!(accepted(valid::work()) >= 95);
    assert!(accepted(valid::bid()) >= 95);
    assert!(accepted(valid::shard_output()) >= 95);
}
