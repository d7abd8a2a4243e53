//! Classification from the embedders (`POST /api/v1/classify`, `mycel
//! submit classify`): texts and labels are embedded across the swarm
//! (cached like a search's). Without examples, each text takes the label
//! whose description it is closest to (zero-shot); with labelled examples,
//! a small softmax head is trained on their vectors here (a few hundred
//! full-batch gradient steps; its 5-fold cross-validated accuracy is
//! reported) and predicts instead.

use mycel_api::{ApiError, ClassifyRequest, ClassifyResult, Prediction};
use mycel_protocol::Advert;
use tokio::sync::mpsc;

use crate::market::Command;
use crate::search::{Searches, cosine, model};
use crate::tasks::Progress;

const MAX_INPUTS: usize = 100_000;
const MAX_LABELS: usize = 64;
const MAX_TRAIN: usize = 10_000;
const STEPS: usize = 300;
const LEARNING_RATE: f32 = 2.0;
const L2: f32 = 1e-3;

/// A label's name and the text that stands for it (`name: description`).
fn anchor(label: &str) -> (String, String) {
    match label.split_once(':') {
        Some((name, description)) if !description.trim().is_empty() => {
            (name.trim().to_string(), description.trim().to_string())
        }
        _ => (label.trim().to_string(), label.trim().to_string()),
    }
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 { v.iter().map(|x| x / n).collect() } else { v.to_vec() }
}

/// A softmax head: one weight row (plus a bias) per class.
#[derive(Debug, Clone)]
pub struct Head {
    weights: Vec<Vec<f32>>,
    bias: Vec<f32>,
}

impl Head {
    /// Trains on unit vectors `x` with classes `y` (< `classes`).
    pub fn train(x: &[Vec<f32>], y: &[usize], classes: usize) -> Self {
        let dims = x.first().map_or(0, Vec::len);
        let mut head = Self { weights: vec![vec![0.0; dims]; classes], bias: vec![0.0; classes] };
        let n = x.len().max(1) as f32;
        for _ in 0..STEPS {
            let mut grad_w = vec![vec![0f32; dims]; classes];
            let mut grad_b = vec![0f32; classes];
            for (xi, &yi) in x.iter().zip(y) {
                let p = head.probabilities(xi);
                for c in 0..classes {
                    let g = p[c] - if c == yi { 1.0 } else { 0.0 };
                    grad_b[c] += g;
                    grad_w[c].iter_mut().zip(xi).for_each(|(w, &v)| *w += g * v);
                }
            }
            for c in 0..classes {
                head.bias[c] -= LEARNING_RATE * grad_b[c] / n;
                for (w, g) in head.weights[c].iter_mut().zip(&grad_w[c]) {
                    *w -= LEARNING_RATE * (g / n + L2 * *w);
                }
            }
        }
        head
    }

    /// Class probabilities of a unit vector.
    pub fn probabilities(&self, x: &[f32]) -> Vec<f32> {
        let logits: Vec<f32> = self
            .weights
            .iter()
            .zip(&self.bias)
            .map(|(w, b)| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        exp.iter().map(|e| e / total).collect()
    }
}

fn best(scores: &[f32]) -> (usize, f32) {
    scores.iter().copied().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, s)| if s > b.1 { (i, s) } else { b })
}

/// Accuracy of heads trained on 4/5 of the examples, on the other fifth,
/// over the five folds (examples taken in order, every fifth to a fold).
pub fn cross_validate(x: &[Vec<f32>], y: &[usize], classes: usize) -> f32 {
    let mut right = 0usize;
    for fold in 0..5 {
        let (mut tx, mut ty) = (Vec::new(), Vec::new());
        for (i, (xi, &yi)) in x.iter().zip(y).enumerate() {
            if i % 5 != fold {
                tx.push(xi.clone());
                ty.push(yi);
            }
        }
        let head = Head::train(&tx, &ty, classes);
        right += x
            .iter()
            .zip(y)
            .enumerate()
            .filter(|(i, (xi, yi))| i % 5 == fold && best(&head.probabilities(xi)).0 == **yi)
            .count();
    }
    right as f32 / x.len().max(1) as f32
}

/// A classification request that passed its checks: its labels' anchors,
/// its examples' classes and the model it will use.
pub struct Classify {
    request: ClassifyRequest,
    anchors: Vec<(String, String)>,
    classes: Vec<usize>,
    model_id: String,
    weights: mycel_protocol::Digest,
}

impl Classify {
    /// Checks `request`: what is wrong with it, before any work starts.
    pub fn check(request: ClassifyRequest, adverts: &[Advert]) -> Result<Self, ApiError> {
        let bad = |why: String| Err(ApiError::BadRequest(why));
        if request.inputs.is_empty() || request.inputs.len() > MAX_INPUTS {
            return bad(format!("inputs: 1..={MAX_INPUTS} texts"));
        }
        if !(2..=MAX_LABELS).contains(&request.labels.len()) {
            return bad(format!("labels: 2..={MAX_LABELS}"));
        }
        if request.train.len() > MAX_TRAIN {
            return bad(format!("train: at most {MAX_TRAIN} examples"));
        }
        let anchors: Vec<(String, String)> = request.labels.iter().map(|l| anchor(l)).collect();
        if anchors.iter().any(|(name, _)| name.is_empty()) {
            return bad("labels: an empty label".into());
        }
        let mut classes = Vec::with_capacity(request.train.len());
        for example in &request.train {
            match anchors.iter().position(|(name, _)| *name == example.label) {
                Some(c) => classes.push(c),
                None => return bad(format!("train: label {:?} is not one of the labels", example.label)),
            }
        }
        if !request.train.is_empty() && (0..anchors.len()).any(|c| !classes.contains(&c)) {
            return bad("train: every label needs at least one example".into());
        }
        let (model_id, weights) = model(adverts, request.model.as_deref())?;
        Ok(Self { request, anchors, classes, model_id, weights })
    }

    /// The embedding model's id.
    pub fn model(&self) -> &str {
        &self.model_id
    }
}

/// Classifies `request.inputs`.
pub async fn classify(
    searches: &Searches,
    request: ClassifyRequest,
    adverts: &[Advert],
    market: &mpsc::Sender<Command>,
) -> Result<ClassifyResult, ApiError> {
    run(searches, Classify::check(request, adverts)?, market, &|_| {}).await
}

/// Runs a checked classification, telling `progress` how its embedding
/// task moves.
pub async fn run(
    searches: &Searches,
    classify: Classify,
    market: &mpsc::Sender<Command>,
    progress: &Progress<'_>,
) -> Result<ClassifyResult, ApiError> {
    let Classify { request, anchors, classes, model_id, weights } = classify;
    let mut texts: Vec<&str> = request.inputs.iter().map(String::as_str).collect();
    texts.extend(anchors.iter().map(|(_, a)| a.as_str()));
    texts.extend(request.train.iter().map(|e| e.text.as_str()));
    let embedded = searches.embed(&texts, weights, market, progress).await?;
    let vectors: Vec<Vec<f32>> = embedded.vectors.iter().map(|v| unit(v)).collect();
    let (inputs, rest) = vectors.split_at(request.inputs.len());
    let (labels, train) = rest.split_at(anchors.len());
    let (method, predictions, cv) = if request.train.is_empty() {
        let predictions = inputs
            .iter()
            .map(|x| {
                let scores: Vec<f32> = labels.iter().map(|l| cosine(x, l)).collect();
                let (c, s) = best(&scores);
                Prediction { label: anchors[c].0.clone(), score: s }
            })
            .collect();
        ("zero-shot", predictions, None)
    } else {
        let cv = (train.len() >= 10).then(|| cross_validate(train, &classes, anchors.len()));
        let head = Head::train(train, &classes, anchors.len());
        let predictions = inputs
            .iter()
            .map(|x| {
                let (c, p) = best(&head.probabilities(x));
                Prediction { label: anchors[c].0.clone(), score: p }
            })
            .collect();
        ("trained head", predictions, cv)
    };
    Ok(ClassifyResult {
        model: model_id,
        method: method.into(),
        predictions,
        cross_validated_accuracy: cv,
        embedded: embedded.embedded,
        cached: embedded.cached,
        tasks: embedded.tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_learns_separable_classes_and_cross_validates() {
        // Two clusters around two axes, with noise.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..40 {
            let jitter = (i as f32 * 0.37).sin() * 0.3;
            let c = i % 2;
            let v = if c == 0 { vec![1.0, jitter, 0.1] } else { vec![jitter, 1.0, -0.1] };
            x.push(unit(&v));
            y.push(c);
        }
        let head = Head::train(&x, &y, 2);
        assert_eq!(best(&head.probabilities(&unit(&[0.9, 0.1, 0.0]))).0, 0);
        assert_eq!(best(&head.probabilities(&unit(&[0.1, 0.9, 0.0]))).0, 1);
        assert!(cross_validate(&x, &y, 2) >= 0.95);
    }

    #[test]
    fn labels_may_carry_a_description() {
        assert_eq!(anchor("pos: a happy, positive review"), ("pos".into(), "a happy, positive review".into()));
        assert_eq!(anchor(" sports "), ("sports".into(), "sports".into()));
        assert_eq!(anchor("odd:"), ("odd:".into(), "odd:".into()));
    }
}
