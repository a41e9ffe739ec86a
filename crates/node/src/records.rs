//! The `Records` gRPC service: stamped writes by table and ULID.

use serde_json::Value;
use tidemark_replicator::convert::raw_object;
use tidemark_replicator::pb;
use tidemark_replicator::status;
use tidemark_store::{ChangeEvent, Store, model::parse_ulid};
use tonic::{Request, Response, Status};
use ulid::Ulid;

#[derive(Debug, Clone)]
pub struct RecordsService {
    store: Store,
}

impl RecordsService {
    pub fn new(store: Store) -> Self {
        RecordsService { store }
    }

    /// The tonic server. A request may be up to four times the largest event
    /// (at least `max_message_bytes`), so a write over `store.max_event_bytes`
    /// reaches the store and is refused naming that limit.
    pub fn into_server(
        self,
        max_message_bytes: usize,
        max_event_bytes: usize,
    ) -> pb::records_server::RecordsServer<Self> {
        let max_request = max_message_bytes.max(max_event_bytes.saturating_mul(4));
        pb::records_server::RecordsServer::new(self)
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(max_message_bytes)
    }
}

/// Largest row a write response echoes (see `WriteResponse.values_omitted`).
const ECHO_LIMIT: usize = 1 << 20;

fn record_id(id: &str) -> Result<Ulid, Status> {
    parse_ulid("id", id).map_err(|e| status::from_store(&e))
}

fn written(event: &ChangeEvent) -> pb::WriteResponse {
    let values_json = event
        .new_values
        .as_ref()
        .map(|v| Value::Object(v.clone()).to_string());
    let values_omitted = values_json.as_ref().is_some_and(|v| v.len() > ECHO_LIMIT);
    pb::WriteResponse {
        written: true,
        event_id: event.event_id.to_string(),
        hlc: event.hlc.encode(),
        operation: event.operation.as_str().to_owned(),
        values_json: values_json.filter(|_| !values_omitted),
        values_omitted,
    }
}

#[tonic::async_trait]
impl pb::records_server::Records for RecordsService {
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        let id = record_id(&req.id)?;
        let values =
            raw_object("values_json", &req.values_json).map_err(|e| status::from_field(&e))?;
        let event = self
            .store
            .put_raw(&req.table, id, &values)
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
