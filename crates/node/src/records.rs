//! The `Records` gRPC service: stamped writes by table and ULID.

use std::convert::Infallible;
use std::sync::Arc;

use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::Value;
use tidemark_replicator::convert::raw_object;
use tidemark_replicator::pb;
use tidemark_replicator::status;
use tidemark_store::{ChangeEvent, Store, model::parse_ulid};
use tokio::sync::Semaphore;
use tonic::codegen::{Bytes, http};
use tonic::{Request, Response, Status};
use ulid::Ulid;

#[derive(Debug, Clone)]
pub struct RecordsService {
    store: Store,
}

/// What write-API requests may carry.
#[derive(Debug, Clone, Copy)]
pub struct WriteLimits {
    /// `store.max_event_bytes`.
    pub max_event_bytes: usize,
    /// `server.max_write_bytes_in_flight`.
    pub in_flight_bytes: usize,
}

impl WriteLimits {
    /// The largest request message admitted: values more than twice the event
    /// limit cannot make an event, whatever their spelling.
    fn max_message(&self) -> usize {
        self.max_event_bytes
            .saturating_mul(2)
            .saturating_add(64 << 10)
    }
}

impl RecordsService {
    pub fn new(store: Store) -> Self {
        RecordsService { store }
    }

    /// The tonic server behind [`Admission`]: each request's message is
    /// admitted against the in-flight budget before it is read.
    /// Callers are checked for the writer role (`auth`) first.
    pub fn into_server(
        self,
        limits: WriteLimits,
        max_message_bytes: usize,
        auth: crate::access::RoleCheck,
    ) -> tonic::service::interceptor::InterceptedService<
        Admission<pb::records_server::RecordsServer<Self>>,
        crate::access::RoleCheck,
    > {
        let server = pb::records_server::RecordsServer::new(self)
            .max_decoding_message_size(limits.max_message())
            .max_encoding_message_size(max_message_bytes);
        tonic::service::interceptor::InterceptedService::new(Admission::new(server, limits), auth)
    }
}

/// Admits write-API requests by the size of their message, from its gRPC
/// length prefix, before the message is read whole: the bytes of every request
/// being read or processed together stay within `server.max_write_bytes_in_flight`
/// (a request that does not fit is answered RESOURCE_EXHAUSTED at once, and
/// one too large for any event INVALID_ARGUMENT, both without reading it).
/// The budget is held until the response is ready.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    limits: WriteLimits,
    /// One permit per byte, `limits.in_flight_bytes` in all.
    budget: Arc<Semaphore>,
}

impl<S> Admission<S> {
    fn new(inner: S, limits: WriteLimits) -> Self {
        let permits = limits.in_flight_bytes.min(Semaphore::MAX_PERMITS);
        Admission {
            inner,
            limits,
            budget: Arc::new(Semaphore::new(permits)),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;

impl<S> tonic::codegen::Service<HttpRequest> for Admission<S>
where
    S: tonic::codegen::Service<HttpRequest, Response = HttpResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<HttpResponse, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        // The clone is the one made ready for the next call; this call takes the
        // ready one (tower's contract).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let (limits, budget) = (self.limits, self.budget.clone());
        Box::pin(async move {
            let (parts, mut body) = request.into_parts();
            // Frames read to find the 5-byte prefix (compressed flag, length),
            // passed on unchanged ahead of the rest of the body.
            let mut read: Vec<http_body::Frame<Bytes>> = Vec::new();
            let mut head: Vec<u8> = Vec::with_capacity(5);
            while head.len() < 5 {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let want = 5 - head.len();
                            head.extend_from_slice(&data[..want.min(data.len())]);
                        }
                        read.push(frame);
                    }
                    Some(Err(status)) => return Ok(status.into_http()),
                    None => break,
                }
            }
            let mut permit = None;
            if let Ok(prefix) = <[u8; 5]>::try_from(head.as_slice()) {
                let [_, len @ ..] = prefix;
                let bytes = u32::from_be_bytes(len) as usize;
                if bytes > limits.max_message() || bytes > limits.in_flight_bytes {
                    return Ok(Status::invalid_argument(format!(
                        "the request is {bytes} bytes: its values cannot make an event within store.max_event_bytes ({})",
                        limits.max_event_bytes
                    ))
                    .into_http());
                }
                let wanted = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
                match budget.clone().try_acquire_many_owned(wanted) {
                    Ok(p) => permit = Some(p),
                    Err(_) => {
                        metrics::counter!("tidemark_writes_refused_total", "reason" => "memory")
                            .increment(1);
                        let held = limits
                            .in_flight_bytes
                            .saturating_sub(budget.available_permits());
                        return Ok(Status::resource_exhausted(format!(
                            "write requests in flight hold {held} of the {} bytes server.max_write_bytes_in_flight allows; this one needs {bytes}: retry shortly",
                            limits.in_flight_bytes
                        ))
                        .into_http());
                    }
                }
            }
            let replay = futures::stream::iter(read.into_iter().map(Ok))
                .chain(http_body_util::BodyStream::new(body));
            // A unary request carries one message: the body may hold no more
            // than the prefix and the length it announced, which the permit
            // covers (a second message would be read outside the budget).
            let body = match &permit {
                Some(p) => tonic::body::Body::new(http_body_util::Limited::new(
                    http_body_util::StreamBody::new(replay),
                    5 + p.num_permits(),
                )),
                None => tonic::body::Body::new(http_body_util::StreamBody::new(replay)),
            };
            let request = http::Request::from_parts(parts, body);
            // The write runs in its own task holding the permit: a caller that
            // goes away (a deadline, a cancel) does not free the budget while
            // its values are still queued or being written.
            let call = tokio::spawn(async move {
                let response = inner.call(request).await;
                drop(permit);
                response
            });
            match call.await {
                Ok(response) => response,
                Err(e) => Ok(Status::internal(format!("the write task failed: {e}")).into_http()),
            }
        })
    }
}

/// Largest row a write response echoes (see `WriteResponse.values_omitted`).
const ECHO_LIMIT: usize = 1 << 20;

fn record_id(id: &str) -> Result<Ulid, Status> {
    parse_ulid("id", id).map_err(|e| status::from_store(&e))
}

fn written(event: &ChangeEvent) -> pb::WriteResponse {
    // Sized before it is built: a large row is not copied just to be left out.
    let values_omitted = event
        .new_values
        .as_ref()
        .is_some_and(|v| tidemark_store::model::json_len(v) > ECHO_LIMIT);
    let values_json = event
        .new_values
        .as_ref()
        .filter(|_| !values_omitted)
        .map(|v| serde_json::to_string(v).unwrap_or_default());
    pb::WriteResponse {
        written: true,
        event_id: event.event_id.to_string(),
        hlc: event.hlc.encode(),
        operation: event.operation.as_str().to_owned(),
        values_json,
        values_omitted,
    }
}

#[tonic::async_trait]
impl pb::records_server::Records for RecordsService {
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let pb::PutRequest {
            table,
            id,
            values_json,
        } = request.into_inner();
        let id = record_id(&id)?;
        let values = raw_object("values_json", &values_json).map_err(|e| status::from_field(&e))?;
        // The parsed values own their text: the request's copy goes now (the
        // budget Admission took for it is held until the response).
        drop(values_json);
        let event = self
            .store
            .put_raw(&table, id, values)
            .await
            .map_err(|e| status::from_store(&e))?;
        metrics::counter!("tidemark_events_captured_total", "source" => "api").increment(1);
        // Direct writes queued before it were stamped in the same transaction.
        crate::http::count_captures(&self.store);
        Ok(Response::new(written(&event)))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        let id = record_id(&req.id)?;
        let event = self
            .store
            .delete(&req.table, id)
            .await
            .map_err(|e| status::from_store(&e))?;
        if event.is_some() {
            metrics::counter!("tidemark_events_captured_total", "source" => "api").increment(1);
        }
        crate::http::count_captures(&self.store);
        Ok(Response::new(
            event.as_ref().map(written).unwrap_or_default(),
        ))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let id = record_id(&req.id)?;
        let values = self
            .store
            .get(&req.table, id)
            .await
            .map_err(|e| status::from_store(&e))?;
        let version = self
            .store
            .version(&req.table, id)
            .await
            .map_err(|e| status::from_store(&e))?;
        Ok(Response::new(pb::GetResponse {
            found: values.is_some(),
            values_json: values.map(|v| Value::Object(v).to_string()),
            hlc: version.as_ref().map_or(0, |v| v.hlc.encode()),
            node_id: version.map(|v| v.node_id.to_string()).unwrap_or_default(),
        }))
    }
}
