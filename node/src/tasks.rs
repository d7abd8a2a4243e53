//! Running ordinary market tasks from inside the node (ensembles,
//! searches): submit, follow, read the result.

use mycel_api::{SubmitRequest, TaskEvent, TaskView};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::market::Command;

/// Runs a task through the market to its end: its view.
pub async fn run_task(market: &mpsc::Sender<Command>, request: SubmitRequest) -> Result<TaskView, String> {
    async fn ask<T>(
        market: &mpsc::Sender<Command>,
        make: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Command,
    ) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        market.send(make(reply)).await.map_err(|_| "the market stopped".to_string())?;
        rx.await.map_err(|_| "the market stopped".to_string())?.map_err(|e| format!("{e:#}"))
    }
    let submitted = ask(market, |reply| Command::Submit { request, reply }).await?;
    let task = submitted.task;
    let mut watch = ask(market, |reply| Command::Watch { task: task.clone(), reply }).await?;
    let mut progress = watch.progress;
    while !progress.finished() {
        match watch.events.recv().await {
            Ok(TaskEvent::Progress(p)) => progress = p,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    let view = ask(market, |reply| Command::Get { task: task.clone(), reply }).await?;
    if view.state != "done" {
        return Err(format!("stage task {task} {}: {}", view.state, view.error.unwrap_or_default()));
    }
    Ok(view)
}
