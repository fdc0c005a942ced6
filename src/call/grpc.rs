//! gRPC delivery (SPEC §3): the native `ferry.v1.Handler/Handle` contract, or any unary method of
//! an existing service with the record's JSON value transcoded to its request message.
//!
//! One HTTP/2 channel per route serves every in-flight call. Both modes go through the same raw
//! unary call; they differ only in how the request is encoded and the response read.

use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use tokio::sync::OnceCell;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{Answer, Attempt, CallError, Status};
use crate::config::{Action, GrpcCall};
use crate::record::Record;

/// The native contract's generated types.
pub mod proto {
    tonic::include_proto!("ferry.v1");
}

const NATIVE_PATH: &str = "/ferry.v1.Handler/Handle";

/// The SPEC's name of a gRPC status code, as written in `ferry.error.status` and in rules.
pub fn code_name(code: i32) -> &'static str {
    match Code::from_i32(code) {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Every code name, for config checks.
pub fn code_from_name(name: &str) -> Option<i32> {
    (0..=16).find(|&c| code_name(c) == name)
}

/// The gRPC transport of one route.
pub struct Grpc {
    channel: Channel,
    timeout: Duration,
    target: Target,
}

enum Target {
    Native,
    Dynamic {
        path: String,
        /// `pkg.Service/Method`, for lookups and messages.
        method: String,
        /// Resolved at start from a descriptor set, or on first use through reflection (the
        /// service may not be up when ferry starts).
        descriptor: OnceCell<MethodDescriptor>,
    },
}

impl Grpc {
    pub fn new(config: &GrpcCall) -> Result<Grpc, String> {
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| format!("`{}` is not a gRPC endpoint: {e}", config.endpoint))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        endpoint = with_tls(endpoint, config.tls())?;
        // Lazy: ferry starts even when the service is not up yet; calls fail (and are retried)
        // until it is.
        let channel = endpoint.connect_lazy();
        let target = match &config.method {
            None => Target::Native,
            Some(method) => {
                let descriptor = OnceCell::new();
                if let Some(file) = &config.descriptor_set {
                    let pool = load_descriptor_set(file)?;
                    let _ = descriptor.set(find_method(&pool, method)?);
                }
                Target::Dynamic {
                    path: format!("/{method}"),
                    method: method.clone(),
                    descriptor,
                }
            }
        };
        Ok(Grpc {
            channel,
            timeout: config.timeout.0,
            target,
        })
    }

    pub async fn call(&self, record: &Record, attempt: &Attempt) -> Result<Answer, CallError> {
        let (path, body, descriptor) = match &self.target {
            Target::Native => (NATIVE_PATH, event(record, attempt).encode_to_vec().into(), None),
            Target::Dynamic {
                path,
                method,
                descriptor,
            } => {
                let d = descriptor
                    .get_or_try_init(|| reflect_method(self.channel.clone(), method))
                    .await?;
                (path.as_str(), to_request(record, &d.input())?, Some(d))
            }
        };
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = metadata(record, attempt);
        // The server learns the deadline too (grpc-timeout), with a little slack so that ferry's
        // own clock decides: a server enforcing it answers CANCELLED, which is not the service's
        // verdict on the record.
        request.set_timeout(self.timeout + self.timeout / 10 + Duration::from_millis(20));
        let started = std::time::Instant::now();
        let call = async {
            let mut client =
                tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(super::MAX_BODY);
            client
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let path = path
                .parse()
                .map_err(|_| tonic::Status::internal("bad method path"))?;
            client.unary(request, path, RawCodec).await
        };
        let response = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Err(CallError::Timeout(self.timeout)),
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status))
                if matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
                    && started.elapsed() >= self.timeout =>
            {
                return Err(CallError::Timeout(self.timeout));
            }
            Ok(Err(status)) if too_large(&status) => {
                return Ok(Answer {
                    status: Status::Grpc(Code::Ok as i32),
                    body_too_large: true,
                    ..Answer::default()
                });
            }
            Ok(Err(status)) => return failed(status),
        };
        match descriptor {
            None => native_answer(response),
            Some(d) => json_answer(response, &d.output()),
        }
    }
}

/// TLS on an `https://` endpoint: only the configured CA is trusted, and the client
/// certificate, if any, is presented (mTLS).
pub(crate) fn with_tls(endpoint: Endpoint, files: crate::config::TlsFiles<'_>) -> Result<Endpoint, String> {
    let Some(pem) = super::tls::load(files)? else {
        return Ok(endpoint);
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem.ca));
    if let Some((cert, key)) = pem.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| format!("bad TLS settings: {e}"))
}

fn event(record: &Record, attempt: &Attempt) -> proto::Event {
    proto::Event {
        topic: record.topic.to_string(),
        partition: record.partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms.unwrap_or(0),
        key: record.key.as_ref().map(|k| k.to_vec()),
        value: record.value.as_ref().map(|v| v.to_vec()).unwrap_or_default(),
        headers: record
            .headers
            .iter()
            .map(|(k, v)| proto::Header {
                key: k.clone(),
                value: v.to_vec(),
            })
            .collect(),
        attempt: attempt.number,
        idempotency_key: record.idempotency_key(),
    }
}

/// The same metadata as the HTTP request headers (SPEC §3), where the value is ASCII text.
fn metadata(record: &Record, attempt: &Attempt) -> MetadataMap {
    let mut m = MetadataMap::new();
    super::describe(record, attempt, |name, value| {
        let value = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<AsciiMetadataValue>().ok());
        match (name.parse::<AsciiMetadataKey>(), value) {
            (Ok(k), Some(v)) => {
                m.append(k, v);
                true
            }
            _ => false,
        }
    });
    m
}

/// Whether tonic refused the reply message for its size, on this side: the service answered,
/// and OUT_OF_RANGE is not its verdict on the record. (A tonic server refuses a request over
/// its own limit with the same words, but with its limit, not ferry's.)
fn too_large(status: &tonic::Status) -> bool {
    let message = status.message();
    status.code() == Code::OutOfRange
        && message.starts_with("Error, decoded message length too large")
        && message.ends_with(&format!("the limit is: {} bytes", super::MAX_BODY))
}

/// A failed call: a transport failure is a connection error, anything else is the service's
/// status, which the outcome table classifies.
fn failed(status: tonic::Status) -> Result<Answer, CallError> {
    // A status with a source was made on this side from a transport error, not sent by the
    // service: a connection refused, a TLS handshake the service rejected after the fact (TLS
    // 1.3 refuses a missing client certificate once the client thinks it is connected, and the
    // call then ends as CANCELLED), a reset.
    if let Some(source) = std::error::Error::source(&status) {
        if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) {
            let mut message = status.message().to_string();
            let mut cause = Some(source);
            while let Some(c) = cause {
                let text = c.to_string();
                if !message.contains(&text) {
                    message = format!("{message}: {text}");
                }
                cause = c.source();
            }
            return Err(if super::never_reached(source) {
                CallError::Unreachable(message)
            } else {
                CallError::Connect(message)
            });
        }
    }
    Ok(Answer {
        status: Status::Grpc(status.code() as i32),
        error: Some(status.message().to_string()),
        ..Answer::default()
    })
}

fn native_answer(body: Bytes) -> Result<Answer, CallError> {
    let reply = proto::Reply::decode(body)
        .map_err(|e| CallError::Contract(format!("the service's Reply cannot be decoded: {e}")))?;
    let action = match proto::Action::try_from(reply.action) {
        Ok(proto::Action::Reply) => Ok(Action::Reply),
        Ok(proto::Action::Retry) => Ok(Action::Retry),
        Ok(proto::Action::DeadLetter) => Ok(Action::DeadLetter),
        Ok(proto::Action::Drop) => Ok(Action::Drop),
        Ok(proto::Action::Unspecified) => {
            Err("Reply.action is ACTION_UNSPECIFIED: set REPLY, RETRY, DEAD_LETTER or DROP".to_string())
        }
        Err(_) => Err(format!("Reply.action {} is not a known action", reply.action)),
    };
    Ok(Answer {
        status: Status::Grpc(0),
        action: Some(action),
        reply_topic: reply.topic,
        reply_key: reply.key.map(Bytes::from),
        headers: reply
            .headers
            .into_iter()
            .map(|h| (h.key, Bytes::from(h.value)))
            .collect(),
        body: reply.payload.map(Bytes::from).unwrap_or_default(),
        error: (!reply.error.is_empty()).then_some(reply.error),
        ..Answer::default()
    })
}

/// The record's JSON value as the method's request message.
fn to_request(record: &Record, input: &MessageDescriptor) -> Result<Bytes, CallError> {
    let value = record.value.as_deref().unwrap_or_default();
    let mut json = serde_json::Deserializer::from_slice(value);
    let mut track = serde_path_to_error::Track::new();
    let message = DynamicMessage::deserialize(
        input.clone(),
        serde_path_to_error::Deserializer::new(&mut json, &mut track),
    )
    .and_then(|m| json.end().map(|()| m))
    .map_err(|e| {
        let path = track.path().to_string();
        let at = if path.is_empty() || path == "." {
            String::new()
        } else {
            format!(" at `{path}`")
        };
        CallError::Encode(format!(
            "the record value does not fit {}{at}: {e}",
            input.full_name()
        ))
    })?;
    Ok(message.encode_to_vec().into())
}

/// The method's response message as JSON, for the reply record.
fn json_answer(body: Bytes, output: &MessageDescriptor) -> Result<Answer, CallError> {
    let message = DynamicMessage::decode(output.clone(), body).map_err(|e| {
        CallError::Contract(format!("the response is not a valid {}: {e}", output.full_name()))
    })?;
    let json = serde_json::to_vec(&message)
        .map_err(|e| CallError::Contract(format!("the response cannot be written as JSON: {e}")))?;
    Ok(Answer {
        status: Status::Grpc(0),
        body: json.into(),
        content_type: Some("application/json".into()),
        ..Answer::default()
    })
}

/// Whether `file` is a descriptor set that describes `method` as ferry can call it (for
/// `validate`: the same checks as at start).
pub fn check_descriptor_set(file: &Path, method: &str) -> Result<(), String> {
    find_method(&load_descriptor_set(file)?, method).map(|_| ())
}

fn load_descriptor_set(file: &Path) -> Result<DescriptorPool, String> {
    let bytes =
        std::fs::read(file).map_err(|e| format!("cannot read descriptor_set {}: {e}", file.display()))?;
    DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
        format!(
            "{} is not a protobuf descriptor set ({e}); make one with `protoc --include_imports --descriptor_set_out=FILE` or buf build -o FILE",
            file.display()
        )
    })
}

fn find_method(pool: &DescriptorPool, method: &str) -> Result<MethodDescriptor, String> {
    let (service, name) = method
        .split_once('/')
        .ok_or_else(|| format!("`{method}` is not a method: write package.Service/Method"))?;
    let s = pool
        .get_service_by_name(service)
        .ok_or_else(|| format!("service `{service}` is not in the descriptor set"))?;
    let m = s
        .methods()
        .find(|m| m.name() == name)
        .ok_or_else(|| format!("service `{service}` has no method `{name}`"))?;
    if m.is_client_streaming() || m.is_server_streaming() {
        return Err(format!(
            "`{method}` is a streaming method; ferry calls unary methods"
        ));
    }
    Ok(m)
}

/// Asks the service for its descriptors through the gRPC server reflection protocol (v1).
async fn reflect_method(channel: Channel, method: &str) -> Result<MethodDescriptor, CallError> {
    reflect(channel, method).await.map_err(|(e, unreachable)| {
        if unreachable {
            CallError::Unreachable(e)
        } else {
            CallError::Connect(e)
        }
    })
}

/// The reflection exchange; an error says whether the service was never reached (a refused
/// connection), which opens the route's circuit at once as any call's would.
async fn reflect(channel: Channel, method: &str) -> Result<MethodDescriptor, (String, bool)> {
    let failed = |e: tonic::Status| {
        let unreachable = std::error::Error::source(&e).is_some_and(super::never_reached);
        let why = if e.code() == tonic::Code::Unimplemented {
            // grpcio's reflection, for one, serves only v1alpha.
            format!(
                "the service does not serve gRPC reflection v1 (grpc.reflection.v1.ServerReflection: {}); serve it, or give the route a descriptor_set",
                e.message()
            )
        } else {
            format!("reflection request failed: {}", e.message())
        };
        (why, unreachable)
    };
    let other = |e: String| (e, false);
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let service = method.split_once('/').map(|(s, _)| s).unwrap_or(method);
    let mut client = ServerReflectionClient::new(channel);
    let mut files: Vec<prost_types::FileDescriptorProto> = Vec::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(service.to_string())];
    while let Some(request) = wanted.pop() {
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([ask]))
            .await
            .map_err(failed)?
            .into_inner();
        let response = stream
            .message()
            .await
            .map_err(failed)?
            .ok_or_else(|| other("the reflection service closed the stream without an answer".into()))?;
        match response.message_response {
            Some(MessageResponse::FileDescriptorResponse(r)) => {
                for raw in r.file_descriptor_proto {
                    let file = prost_types::FileDescriptorProto::decode(raw.as_slice())
                        .map_err(|e| other(format!("reflection returned a bad descriptor: {e}")))?;
                    if !files.iter().any(|f| f.name == file.name) {
                        files.push(file);
                    }
                }
            }
            Some(MessageResponse::ErrorResponse(e)) => {
                return Err(other(format!(
                    "reflection: {} (is `{service}` served?)",
                    e.error_message
                )));
            }
            _ => return Err(other("reflection gave an unexpected answer".into())),
        }
        // Ask for imports the answers did not include.
        for dep in files.iter().flat_map(|f| f.dependency.iter()) {
            if !files.iter().any(|f| f.name.as_deref() == Some(dep.as_str())) {
                wanted.push(MessageRequest::FileByFilename(dep.clone()));
            }
        }
        wanted.dedup();
    }
    let pool = DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet { file: files })
        .map_err(|e| other(format!("reflection returned inconsistent descriptors: {e}")))?;
    find_method(&pool, method).map_err(other)
}

/// Passes already-encoded messages through, so one client serves every method.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ferry_s_own_size_limit_is_too_large_not_a_server_refusing_the_request() {
        let refused = |limit: usize| {
            tonic::Status::out_of_range(format!(
                "Error, decoded message length too large: found 17825792 bytes, the limit is: {limit} bytes"
            ))
        };
        assert!(too_large(&refused(crate::call::MAX_BODY)));
        assert!(
            !too_large(&refused(4 << 20)),
            "the service's limit, for ferry's request"
        );
        assert!(!too_large(&tonic::Status::out_of_range("as asked")));
    }

    #[test]
    fn code_names_round_trip() {
        for c in 0..=16 {
            assert_eq!(code_from_name(code_name(c)), Some(c));
        }
        assert_eq!(code_name(Code::NotFound as i32), "NOT_FOUND");
        assert_eq!(code_from_name("NOPE"), None);
    }
}
