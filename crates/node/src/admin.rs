//! The `Admin` gRPC service: node status, conflicts and their resolution,
//! conflict policies, record history, blocked records, captures set aside, and
//! row digests that compare nodes.

use serde_json::Value;
use tidemark_replicator::convert::{event_to_pb, positions_to_pb, raw_object, vector_to_pb};
use tidemark_replicator::{Phase, Sender, pb, status};
use tidemark_store::engine::digest::MAX_RECORDS;
use tidemark_store::model::parse_ulid;
use tidemark_store::{
    Blocked, Conflict, ConflictFilter, ConflictPolicy, ConflictSide, ConflictStatus, ResolveChoice,
    SetAside, Store,
};
use tonic::{Request, Response, Status};
use tracing::info;
use ulid::Ulid;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

#[derive(Debug, Clone)]
pub struct AdminService {
    store: Store,
    sender: Sender,
    /// Peers' configured names.
    peer_names: crate::peers::PeerNames,
    name: String,
    cluster_id: String,
}

impl AdminService {
    pub fn new(
        store: Store,
        sender: Sender,
        peer_names: crate::peers::PeerNames,
        name: String,
        cluster_id: String,
    ) -> Self {
        AdminService {
            store,
            sender,
            peer_names,
            name,
            cluster_id,
        }
    }

    /// The tonic server for this service, behind `auth`.
    pub fn into_server(
        self,
        max_message_bytes: usize,
        auth: crate::access::RoleCheck,
    ) -> tonic::service::interceptor::InterceptedService<
        pb::admin_server::AdminServer<Self>,
        crate::access::RoleCheck,
    > {
        tonic::service::interceptor::InterceptedService::new(
            pb::admin_server::AdminServer::new(self)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            auth,
        )
    }
}

fn values_json(v: &Option<tidemark_store::Values>) -> Option<String> {
    v.as_ref().map(|m| Value::Object(m.clone()).to_string())
}

fn side(s: &ConflictSide) -> pb::ConflictVersion {
    pb::ConflictVersion {
        event_id: s.event_id.to_string(),
        hlc: s.hlc.encode(),
        node_id: s.node_id.to_string(),
        values_json: values_json(&s.values),
    }
}

/// A conflict as the wire shows it.
pub fn conflict_to_pb(c: &Conflict) -> pb::ConflictInfo {
    pb::ConflictInfo {
        conflict_id: c.conflict_id.to_string(),
        table: c.table_name.clone(),
        record_id: c.record_id.to_string(),
        policy: c.policy.as_str().to_owned(),
        status: c.status.as_str().to_owned(),
        local: Some(side(&c.winner)),
        remote: Some(side(&c.loser)),
        detected_at: c.detected_at.clone(),
        resolved_at: c.resolved_at.clone().unwrap_or_default(),
        resolved_by: c.resolved_by.clone().unwrap_or_default(),
        resolution: c.resolution.clone().unwrap_or_default(),
        resolution_note: c.resolution_note.clone().unwrap_or_default(),
        resolution_event_id: c
            .resolution_event_id
            .map(|e| e.to_string())
            .unwrap_or_default(),
    }
}

fn store_status(e: tidemark_store::StoreError) -> Status {
    status::from_store(&e)
}

fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// A blocked record as the wire shows it.
fn blocked_to_pb(b: &Blocked) -> pb::BlockedRecord {
    pb::BlockedRecord {
        table: b.table_name.clone(),
        record_id: b.record_id.to_string(),
        event_id: b.event_id.to_string(),
        kind: b.kind.as_str().to_owned(),
        reason: b.reason.clone(),
        blocker_table: b.blocker_table.clone().unwrap_or_default(),
        blocker_id: b.blocker_id.map(|i| i.to_string()).unwrap_or_default(),
        blocked_at: b.blocked_at.clone(),
    }
}

fn set_aside_to_pb(s: &SetAside) -> pb::UnreplicatedCapture {
    pb::UnreplicatedCapture {
        seq: s.seq,
        table: s.table_name.clone(),
        record_id: s.record_id.clone(),
        operation: s.operation.clone(),
        reason: s.reason.clone(),
        set_aside_at: s.set_aside_at.clone(),
    }
}

/// The page token after a blocked record: its table and record id.
fn blocked_token(b: &Blocked) -> String {
    format!("{}/{}", b.table_name, b.record_id)
}

fn parse_blocked_token(token: &str) -> Result<(String, Ulid), Status> {
    let (table, record) = token.rsplit_once('/').ok_or_else(|| {
        Status::invalid_argument(format!(
            "page_token: {token:?} is not a token this service gave"
        ))
    })?;
    let record = parse_ulid("page_token", record).map_err(store_status)?;
    Ok((table.to_owned(), record))
}

/// A key below every record of `table` in (table, record) order: `table` less
/// its last character (a prefix sorts first), after every id. Records of tables
/// between it and `table` are passed over by the caller.
fn before_table(table: &str) -> (String, Ulid) {
    let mut prefix = table.to_owned();
    prefix.pop();
    (prefix, Ulid::from(u128::MAX))
}

/// An optional record id of a Digest range: empty is none.
fn range_id(field: &str, text: &str) -> Result<Option<Ulid>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_ulid(field, text).map(Some).map_err(store_status)
}

/// The entries a discard names in `field`, or `None` for `all`: exactly one
/// of the two.
fn named_or_all<'a, T>(field: &str, named: &'a [T], all: bool) -> Result<Option<&'a [T]>, Status> {
    match (all, named.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(named)),
        (true, false) => Err(Status::invalid_argument(format!(
            "give either {field} or all, not both"
        ))),
        (false, true) => Err(Status::invalid_argument(format!(
            "{field}: name the entries to discard, or set all"
        ))),
    }
}

fn id_text(id: Option<Ulid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_default()
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let vector = self.store.vector().await.map_err(store_status)?;
        let states: std::collections::HashMap<_, _> = self.sender.states().into_iter().collect();
        let mut peers = Vec::new();
        for p in self.sender.peers().current().iter() {
            let state = states.get(&p.node_id).cloned().unwrap_or_default();
            let acked = self
                .store
                .peer_progress(p.node_id)
                .await
                .map_err(store_status)?;
            // From the log, like the lag gauges: the sender's in-flight count
            // is gone when its session is.
            let (unacked, oldest) = self.store.peer_lag(p.node_id).await.map_err(store_status)?;
            peers.push(pb::PeerStatus {
                node_id: p.node_id.to_string(),
                address: p.address.clone(),
                connected: state.connected,
                released: state.released,
                unacked_events: unacked,
                oldest_unacked_ms: oldest.unwrap_or(0),
                last_ack_ms: state.last_ack_wall_ms.unwrap_or(0),
                last_error: state.last_error.unwrap_or_default(),
                acked: Some(vector_to_pb(&acked)),
                held: state
                    .held
                    .iter()
                    .map(|h| pb::HeldOrigin {
                        origin: h.origin.to_string(),
                        code: h.code.clone(),
                        reason: h.reason.clone(),
                        retry_at_ms: h.retry_at_ms,
                    })
                    .collect(),
                blocked_records: state.blocked_records,
                name: self
                    .peer_names
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&p.node_id)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        let open: std::collections::HashMap<String, u64> = self
            .store
            .open_conflicts_by_table()
            .await
            .map_err(store_status)?
            .into_iter()
            .collect();
        let tables = self
            .store
            .tables()
            .iter()
            .map(|t| pb::TableStatus {
                name: t.table_name.clone(),
                conflict_policy: t.conflict_policy.as_str().to_owned(),
                columns: t.columns.clone(),
                open_conflicts: open.get(&t.table_name).copied().unwrap_or(0),
            })
            .collect();
        // The phase first: positions only grow, so an active node's positions,
        // read after, cover what it caught up with.
        let phase = self.sender.catch_up().phase();
        let positions = self.store.positions();
        let catch_up = self.sender.catch_up().status(&positions);
        Ok(Response::new(pb::StatusResponse {
            node_id: self.store.node_id().to_string(),
            name: self.name.clone(),
            cluster_id: self.cluster_id.clone(),
            store: self.store.kind().to_owned(),
            hlc: self.store.clock().now().encode(),
            vector: Some(vector_to_pb(&vector)),
            peers,
            tables,
            unsynced_events: self.store.count_unsynced().await.map_err(store_status)?,
            pending_captures: self.store.pending_captures().await.map_err(store_status)?,
            blocked_records: self.store.count_blocked().await.map_err(store_status)?,
            unreplicated_captures: self.store.count_set_aside().await.map_err(store_status)?,
            quarantined_events: self.store.count_quarantined().await.map_err(store_status)?,
            writes_held: self.store.own_writes_held(),
            positions: positions_to_pb(&positions),
            state: phase.to_string(),
            catchup_remaining_events: if phase == Phase::Active {
                0
            } else {
                catch_up.remaining_events
            },
            catchup_held_origins: catch_up.held_origins.iter().map(Ulid::to_string).collect(),
        }))
    }

    async fn list_conflicts(
        &self,
        request: Request<pb::ListConflictsRequest>,
    ) -> Result<Response<pb::ListConflictsResponse>, Status> {
        let req = request.into_inner();
        let status = match req.status.as_str() {
            "" | "all" => None,
            s => Some(s.parse::<ConflictStatus>().map_err(store_status)?),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            t => Some(parse_ulid("page_token", t).map_err(store_status)?),
        };
        let limit = page_size(req.page_size);
        let filter = ConflictFilter {
            table: (!req.table.is_empty()).then_some(req.table),
            status,
            after,
            limit: limit + 1,
        };
        let mut found = self
            .store
            .list_conflicts(&filter)
            .await
            .map_err(store_status)?;
        let more = found.len() > limit as usize;
        found.truncate(limit as usize);
        let next_page_token = match (more, found.last()) {
            (true, Some(last)) => last.conflict_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListConflictsResponse {
            conflicts: found.iter().map(conflict_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn get_conflict(
        &self,
        request: Request<pb::GetConflictRequest>,
    ) -> Result<Response<pb::ConflictInfo>, Status> {
        let id =
            parse_ulid("conflict_id", &request.into_inner().conflict_id).map_err(store_status)?;
        let c = self
            .store
            .conflict(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no conflict {id}")))?;
        Ok(Response::new(conflict_to_pb(&c)))
    }

    async fn resolve_conflict(
        &self,
        request: Request<pb::ResolveConflictRequest>,
    ) -> Result<Response<pb::ResolveConflictResponse>, Status> {
        let caller = request.remote_addr();
        let auth = request
            .extensions()
            .get::<crate::access::Caller>()
            .map_or_else(|| "unknown".to_owned(), |c| c.0.clone());
        let req = request.into_inner();
        let id = parse_ulid("conflict_id", &req.conflict_id).map_err(store_status)?;
        if req.resolved_by.trim().is_empty() {
            return Err(Status::invalid_argument(
                "resolved_by: say who resolves the conflict",
            ));
        }
        let choice = match pb::ResolveChoice::try_from(req.choice) {
            Ok(pb::ResolveChoice::KeepLocal) => ResolveChoice::KeepLocal,
            Ok(pb::ResolveChoice::KeepRemote) => ResolveChoice::KeepRemote,
            Ok(pb::ResolveChoice::Merged) => ResolveChoice::Merged(
                raw_object("values_json", &req.values_json).map_err(|e| status::from_field(&e))?,
            ),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "choice: {} is not one of KEEP_LOCAL (1), KEEP_REMOTE (2), MERGED (3)",
                    req.choice
                )));
            }
        };
        if !matches!(choice, ResolveChoice::Merged(_)) && !req.values_json.is_empty() {
            return Err(Status::invalid_argument(
                "values_json: only a MERGED resolution takes values",
            ));
        }
        let note = (!req.note.is_empty()).then_some(req.note.as_str());
        let expected = (!req.expected_winner_event_id.is_empty())
            .then(|| parse_ulid("expected_winner_event_id", &req.expected_winner_event_id))
            .transpose()
            .map_err(store_status)?;
        let kind = choice.kind();
        let event = self
            .store
            .resolve_conflict(id, choice, &req.resolved_by, note, expected)
            .await
            .map_err(store_status)?;
        info!(
            conflict = %id,
            resolution = kind,
            resolved_by = %req.resolved_by,
            ?caller,
            auth = %auth,
            event = %event.event_id,
            "conflict resolved"
        );
        Ok(Response::new(pb::ResolveConflictResponse {
            event_id: event.event_id.to_string(),
            hlc: event.hlc.encode(),
            values_json: values_json(&event.new_values),
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let caller = request.remote_addr();
        let auth = request
            .extensions()
            .get::<crate::access::Caller>()
            .map_or_else(|| "unknown".to_owned(), |c| c.0.clone());
        let req = request.into_inner();
        let policy: ConflictPolicy = req.conflict_policy.parse().map_err(store_status)?;
        let event = self
            .store
            .set_policy(&req.table, policy)
            .await
            .map_err(store_status)?;
        info!(table = %req.table, policy = %policy, ?caller, auth = %auth, "conflict policy set");
        Ok(Response::new(pb::SetPolicyResponse {
            event_id: event.event_id.to_string(),
        }))
    }

    async fn record_history(
        &self,
        request: Request<pb::RecordHistoryRequest>,
    ) -> Result<Response<pb::RecordHistoryResponse>, Status> {
        let req = request.into_inner();
        let id = parse_ulid("id", &req.id).map_err(store_status)?;
        let events = self
            .store
            .history(&req.table, id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RecordHistoryResponse {
            events: events.iter().map(event_to_pb).collect(),
        }))
    }

    async fn list_blocked(
        &self,
        request: Request<pb::ListBlockedRequest>,
    ) -> Result<Response<pb::ListBlockedResponse>, Status> {
        let req = request.into_inner();
        let table = (!req.table.is_empty()).then_some(req.table);
        if let Some(t) = &table {
            self.store.table(t).map_err(store_status)?;
        }
        let limit = page_size(req.page_size) as usize;
        let mut cursor = match (req.page_token.as_str(), &table) {
            ("", None) => None,
            ("", Some(t)) => Some(before_table(t)),
            (token, _) => Some(parse_blocked_token(token)?),
        };
        // One more than a page tells whether another follows. The store pages
        // every table in its key order (the database's, for table names):
        // records of other tables are passed over, and a table's records come
        // together, so the first other table after them ends the list.
        let mut found: Vec<Blocked> = Vec::new();
        'pages: loop {
            let page = self
                .store
                .list_blocked(cursor.clone(), limit as u32 + 1)
                .await
                .map_err(store_status)?;
            let last_page = page.len() <= limit;
            for b in page {
                cursor = Some((b.table_name.clone(), b.record_id));
                if table.as_ref().is_some_and(|t| b.table_name != *t) {
                    if found.is_empty() {
                        continue;
                    }
                    break 'pages;
                }
                found.push(b);
                if found.len() > limit {
                    break 'pages;
                }
            }
            if last_page {
                break;
            }
        }
        let more = found.len() > limit;
        found.truncate(limit);
        let next_page_token = match (more, found.last()) {
            (true, Some(last)) => blocked_token(last),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListBlockedResponse {
            blocked: found.iter().map(blocked_to_pb).collect(),
            next_page_token,
            total: self.store.count_blocked().await.map_err(store_status)?,
        }))
    }

    async fn list_unreplicated(
        &self,
        request: Request<pb::ListUnreplicatedRequest>,
    ) -> Result<Response<pb::ListUnreplicatedResponse>, Status> {
        let limit = page_size(request.into_inner().limit);
        let captures = self
            .store
            .list_set_aside(limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListUnreplicatedResponse {
            captures: captures.iter().map(set_aside_to_pb).collect(),
            total: self.store.count_set_aside().await.map_err(store_status)?,
        }))
    }

    async fn retry_blocked(
        &self,
        request: Request<pb::RetryBlockedRequest>,
    ) -> Result<Response<pb::RetryBlockedResponse>, Status> {
        let req = request.into_inner();
        let table = (!req.table.is_empty()).then_some(req.table.as_str());
        let (tried, placed) = self
            .store
            .retry_blocked(table)
            .await
            .map_err(store_status)?;
        info!(
            table = table.unwrap_or("*"),
            tried, placed, "blocked records retried by an operator"
        );
        Ok(Response::new(pb::RetryBlockedResponse { tried, placed }))
    }

    async fn discard_unreplicated(
        &self,
        request: Request<pb::DiscardUnreplicatedRequest>,
    ) -> Result<Response<pb::DiscardUnreplicatedResponse>, Status> {
        let req = request.into_inner();
        let seqs = named_or_all("seqs", &req.seqs, req.all)?;
        let discarded = self
            .store
            .discard_set_aside(seqs)
            .await
            .map_err(store_status)?;
        info!(discarded, "unreplicated captures discarded by an operator");
        Ok(Response::new(pb::DiscardUnreplicatedResponse { discarded }))
    }

    async fn list_quarantined(
        &self,
        request: Request<pb::ListQuarantinedRequest>,
    ) -> Result<Response<pb::ListQuarantinedResponse>, Status> {
        let limit = page_size(request.into_inner().limit);
        let events = self
            .store
            .list_quarantined(limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListQuarantinedResponse {
            events: events
                .into_iter()
                .map(|q| pb::QuarantinedEvent {
                    event_id: q.event_id,
                    peer_id: q.peer_id.unwrap_or_default(),
                    code: q.code,
                    reason: q.reason,
                    event_json: q.event,
                    received_at: q.received_at,
                })
                .collect(),
            total: self.store.count_quarantined().await.map_err(store_status)?,
        }))
    }

    async fn discard_quarantined(
        &self,
        request: Request<pb::DiscardQuarantinedRequest>,
    ) -> Result<Response<pb::DiscardQuarantinedResponse>, Status> {
        let req = request.into_inner();
        let ids = named_or_all("event_ids", &req.event_ids, req.all)?;
        let discarded = self
            .store
            .discard_quarantined(ids)
            .await
            .map_err(store_status)?;
        info!(discarded, "quarantined events discarded by an operator");
        Ok(Response::new(pb::DiscardQuarantinedResponse { discarded }))
    }

    async fn digest(
        &self,
        request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let req = request.into_inner();
        let from = range_id("from_id", &req.from_id)?;
        let to = range_id("to_id", &req.to_id)?;
        if req.records {
            let hashes = self
                .store
                .record_hashes(&req.table, from, to, MAX_RECORDS)
                .await
                .map_err(store_status)?;
            return Ok(Response::new(pb::DigestResponse {
                ranges: Vec::new(),
                records: hashes
                    .records
                    .into_iter()
                    .map(|r| pb::RecordHash {
                        id: r.id.to_string(),
                        hash: r.hash,
                    })
                    .collect(),
                truncated: hashes.truncated,
            }));
        }
        let ranges = self
            .store
            .digest(&req.table, from, to, req.parts)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DigestResponse {
            ranges: ranges
                .into_iter()
                .map(|r| pb::RangeDigest {
                    from_id: id_text(r.from),
                    to_id: id_text(r.to),
                    rows: r.rows,
                    digest: r.digest,
                })
                .collect(),
            records: Vec::new(),
            truncated: false,
        }))
    }
}
