//! request-response codec for [`RPC_PROTOCOL`](mycel_protocol::version::RPC_PROTOCOL):
//! a 4-byte big-endian length, then one message in the protocol codec.
//! The length is checked against the message kind's cap before anything is
//! allocated; a frame that does not decode fails the stream, not the node.

use std::io;
use std::sync::Arc;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use mycel_metrics::Metrics;
use mycel_protocol::Wire;
use mycel_protocol::rpc::{Request, Response};

/// The codec; counts the bytes it moves.
#[derive(Debug, Clone, Default)]
pub struct RpcCodec {
    metrics: Arc<Metrics>,
}

impl RpcCodec {
    /// A codec that adds to these counters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

async fn read_frame<T: Wire, R: AsyncRead + Unpin + Send>(io: &mut R, metrics: &Metrics) -> io::Result<T> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > T::MAX_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} frame of {len} bytes exceeds the {}-byte limit", T::KIND, T::MAX_SIZE),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    metrics.bytes_in.add(4 + len as u64);
    T::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T: Wire, W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    value: &T,
    metrics: &Metrics,
) -> io::Result<()> {
    let bytes = value.encode().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    metrics.bytes_out.add(4 + bytes.len() as u64);
    io.close().await
}

impl libp2p::request_response::Codec for RpcCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        read_frame(io, &self.metrics).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response> {
        read_frame(io, &self.metrics).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()> {
        write_frame(io, &req, &self.metrics).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()> {
        write_frame(io, &res, &self.metrics).await
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    use super::*;

    fn protocol() -> StreamProtocol {
        StreamProtocol::new(mycel_protocol::version::RPC_PROTOCOL)
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Cursor::new(Vec::new());
        RpcCodec::default().write_response(&protocol(), &mut buf, Response::Refused("busy".into())).await.unwrap();
        let mut read = Cursor::new(buf.into_inner());
        let codec = RpcCodec::default();
        let back = codec.clone().read_response(&protocol(), &mut read).await.unwrap();
        assert_eq!(back, Response::Refused("busy".into()));
        assert!(codec.metrics.bytes_in.get() > 4, "bytes counted");
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_reading() {
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        let err = RpcCodec::default().read_request(&protocol(), &mut Cursor::new(frame)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let frame = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(RpcCodec::default().read_request(&protocol(), &mut Cursor::new(frame.to_vec())).await.is_err());
        let short = [0, 0, 0, 9, 0];
        assert!(RpcCodec::default().read_request(&protocol(), &mut Cursor::new(short.to_vec())).await.is_err());
    }
}
