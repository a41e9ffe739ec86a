//! Registration of replicated tables (columns, classes, triggers) and their
//! conflict policy, which replicates as an event on the registry pseudo-table.

use super::*;

/// Names reserved for Tidemark's own tables.
const RESERVED_PREFIX: &str = "tidemark_";

impl<B: Backend> Engine<B> {
    pub(super) async fn reload_tables(&self) -> Result<()> {
        let mut loaded = self.backend.load_tables().await?;
        for info in &mut loaded {
            if info.types.len() != info.columns.len() {
                self.fill_classes(info).await?;
            }
            let ident = Ident::parse("table name", &info.table_name)?;
            if let Some(shape) = self.backend.inspect_table(&ident).await? {
                let (uniques, foreign_keys) = self.constraints(info, &shape).await?;
                info.uniques = uniques;
                info.foreign_keys = foreign_keys;
            }
        }
        let map = loaded
            .into_iter()
            .map(|t| (t.table_name.clone(), Arc::new(t)))
            .collect();
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// The UNIQUE constraints and FOREIGN KEYs of a table over its replicated
    /// columns, as Tidemark decides clashes on them (a FOREIGN KEY naming no
    /// parent columns references the parent's primary key).
    pub(super) async fn constraints(
        &self,
        info: &TableInfo,
        shape: &crate::backend::TableShape,
    ) -> Result<(Vec<Vec<String>>, Vec<crate::model::ForeignKey>)> {
        let replicated = |cols: &[String]| cols.iter().all(|c| info.has_column(c));
        let uniques: Vec<Vec<String>> = shape
            .uniques
            .iter()
            .filter(|u| replicated(u))
            .cloned()
            .collect();
        let mut foreign_keys = Vec::new();
        for fk in &shape.foreign_keys {
            if !replicated(&fk.columns) {
                continue;
            }
            let mut fk = fk.clone();
            if fk.parent_columns.is_empty() {
                let parent = Ident::parse("table name", &fk.parent)?;
                if let Some(p) = self.backend.inspect_table(&parent).await? {
                    fk.parent_columns = p.primary_key;
                }
            }
            foreign_keys.push(fk);
        }
        foreign_keys.sort();
        Ok((uniques, foreign_keys))
    }

    /// Fills in the column classes of a table registered before they were kept,
    /// from its live schema.
    pub(super) async fn fill_classes(&self, info: &mut TableInfo) -> Result<()> {
        let ident = Ident::parse("table name", &info.table_name)?;
        let shape = self.backend.inspect_table(&ident).await?.ok_or_else(|| {
            StoreError::corrupt(&info.table_name, "a registered table no longer exists")
        })?;
        let (mut types, mut declared) = (Vec::new(), Vec::new());
        for col in &info.columns {
            let (_, ty) = shape
                .columns
                .iter()
                .find(|(c, _)| c == col)
                .ok_or_else(|| {
                    StoreError::corrupt(&info.table_name, format!("column {col} no longer exists"))
                })?;
            let class = if *col == info.primary_key {
                ColumnType::Text { max_chars: None }
            } else {
                self.backend
                    .column_type(ty)
                    .map_err(|reason| StoreError::Unregistrable {
                        table: info.table_name.clone(),
                        reason: format!("column {col} ({ty}): {reason}"),
                    })?
            };
            types.push(class);
            declared.push(ty.clone());
        }
        info.types = types;
        info.declared = declared;
        Ok(())
    }

    /// Registered tables, by name.
    pub fn tables(&self) -> Vec<Arc<TableInfo>> {
        let map = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.table_name.cmp(&b.table_name));
        v
    }

    /// The registered table `name`, or [`StoreError::UnknownTable`].
    pub fn table(&self, name: &str) -> Result<Arc<TableInfo>> {
        let map = self.tables.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned().ok_or_else(|| {
            let mut names: Vec<_> = map.keys().cloned().collect();
            names.sort();
            StoreError::UnknownTable {
                table: crate::model::truncate(name),
                registered: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            }
        })
    }

    /// Registers `name` for replication with `policy` (see [`Backend::register`]).
    /// Registering again refreshes the column list and triggers; the policy of an
    /// already registered table is kept (change it with [`Engine::set_policy`]).
    pub async fn register_table(&self, name: &str, policy: ConflictPolicy) -> Result<TableInfo> {
        self.register_table_with(name, policy, &BTreeMap::new())
            .await
    }

    /// [`Engine::register_table`] with type overrides: the class of some SQLite
    /// columns whose declared type does not say it (e.g. `decimal(10,2)` for a
    /// TEXT column). PostgreSQL's types fix their class; an override there must
    /// agree with it.
    pub async fn register_table_with(
        &self,
        name: &str,
        policy: ConflictPolicy,
        overrides: &BTreeMap<String, ColumnType>,
    ) -> Result<TableInfo> {
        let ident = Ident::parse("table name", name)?;
        let unregistrable = |reason: String| StoreError::Unregistrable {
            table: name.to_owned(),
            reason,
        };
        if name.starts_with(RESERVED_PREFIX) || name == "change_events" {
            return Err(unregistrable(
                "the name is reserved for Tidemark's own tables".into(),
            ));
        }
        let shape = self
            .backend
            .inspect_table(&ident)
            .await?
            .ok_or_else(|| unregistrable("no such table".into()))?;
        let [pk] = shape.primary_key.as_slice() else {
            return Err(unregistrable(format!(
                "it must have a single-column ULID primary key; its primary key is {}",
                if shape.primary_key.is_empty() {
                    "missing".to_owned()
                } else {
                    format!("({})", shape.primary_key.join(", "))
                }
            )));
        };
        let (_, pk_type) = shape
            .columns
            .iter()
            .find(|(c, _)| c == pk)
            .ok_or_else(|| unregistrable(format!("primary key column {pk} not found")))?;
        if !is_ulid_text_type(pk_type) {
            return Err(unregistrable(format!(
                "primary key {pk} has type {pk_type}; a ULID key must be TEXT, CHAR(26) or VARCHAR(26)"
            )));
        }
        for col in overrides.keys() {
            if !shape.columns.iter().any(|(c, _)| c == col) {
                return Err(unregistrable(format!(
                    "a type override names column {col:?}, which the table does not have"
                )));
            }
        }
        let mut columns = vec![pk.clone()];
        let mut types = vec![ColumnType::Text { max_chars: None }];
        let mut declared = vec![pk_type.clone()];
        for (col, ty) in &shape.columns {
            if col == pk || STAMP_COLUMNS.contains(&col.as_str()) {
                continue;
            }
            Ident::parse("column name", col).map_err(|_| {
                unregistrable(format!(
                    "column {col:?} is not a plain identifier (letters, digits, _)"
                ))
            })?;
            let derived = self.backend.column_type(ty);
            let class = match (overrides.get(col), self.backend.kind()) {
                (Some(o), "postgres") => match derived {
                    Ok(d) if d == *o => d,
                    Ok(d) => {
                        return Err(unregistrable(format!(
                            "column {col}: the override {o} differs from {d}, the class of its PostgreSQL type {ty}; overrides are for SQLite columns"
                        )));
                    }
                    Err(reason) => return Err(unregistrable(format!("column {col}: {reason}"))),
                },
                (Some(o), _) => {
                    o.fits_sqlite(ty)
                        .map_err(|reason| unregistrable(format!("column {col}: {reason}")))?;
                    *o
                }
                (None, _) => derived
                    .map_err(|reason| unregistrable(format!("column {col} ({ty}): {reason}")))?,
            };
            columns.push(col.clone());
            types.push(class);
            declared.push(ty.clone());
        }
        let existing = self.table(name).ok();
        let mut info = TableInfo {
            datatype_id: datatype_id(name),
            table_name: name.to_owned(),
            primary_key: pk.clone(),
            columns,
            types,
            declared,
            // The registry is authoritative once a table is registered: a policy
            // changes only through set_policy, which replicates.
            conflict_policy: existing.as_ref().map_or(policy, |t| t.conflict_policy),
            uniques: Vec::new(),
            foreign_keys: Vec::new(),
        };
        (info.uniques, info.foreign_keys) = self.constraints(&info, &shape).await?;
        // Held across the reload, so no drain meets captures of a table it does
        // not know yet, and two registrations cannot both snapshot the rows.
        let _w = self.writer.lock().await;
        let existing = self.table(name).ok();
        if existing.is_some() {
            // Captures made by the current triggers are read with the current
            // column list before the triggers change.
            let mut tx = self.begin_tx().await?;
            let drained = self.drain_in(&mut tx).await?;
            self.commit_tx(tx).await?;
            if drained.events > 0 {
                self.committed();
            }
        }
        self.backend.register(&info, existing.is_none()).await?;
        self.reload_tables().await?;
        Ok(info)
    }

    /// Sets a table's conflict policy cluster-wide: the change is an event on the
    /// registry (`tidemark_datatypes`) that replicates like any write, last writer
    /// wins. Conflicts follow the policy: switching to `lww` decides the open
    /// ones, switching to `manual` reopens those decided by `lww` whose versions
    /// are still concurrent.
    pub async fn set_policy(&self, table: &str, policy: ConflictPolicy) -> Result<ChangeEvent> {
        let info = self.table(table)?;
        let registry = registry_table();
        let record = datatype_id(&info.table_name);
        let values = registry_values(&info.table_name, policy);
        self.own_writes_released().await;
        let _w = self.writer.lock().await;
        let mut tx = self.begin_tx().await?;
        self.drain_in(&mut tx).await?;
        let mut cache = VersionCache::new();
        let local = self
            .cached_version(&mut tx, &mut cache, &registry, record)
            .await?;
        let old = local
            .as_ref()
            .map(|_| registry_values(&info.table_name, info.conflict_policy));
        let event = self.local_event(
            &registry,
            record,
            Operation::Update,
            old,
            Some(values),
            local.as_ref(),
            None,
        );
        self.settle(&mut tx, &registry, &event, &mut cache).await?;
        self.apply_policy(&mut tx, &info.table_name, policy).await?;
        self.commit_local(tx, &event).await?;
        self.reload_tables().await?;
        Ok(event)
    }

    /// Sets the policy inside `tx` and labels the table's conflicts by it
    /// ([`Conflict::label`]): under `lww` the open ones are decided, under
    /// `manual` those decided by `lww` and not closed by a later write open
    /// again. The labels depend only on the policy and each conflict's closing
    /// write, so every node ends the same whatever it held when it switched.
    pub(super) async fn apply_policy(
        &self,
        tx: &mut B::Tx,
        table: &str,
        policy: ConflictPolicy,
    ) -> Result<()> {
        self.backend.set_policy(tx, table, policy).await?;
        let mut changed = Vec::new();
        for c in self.backend.table_conflicts(tx, table).await? {
            let mut next = c.clone();
            next.label(policy, crate::model::Closer::of(&c));
            if next != c {
                changed.push(next);
            }
        }
        self.backend.put_conflicts(tx, &changed).await
    }
}

/// The registry's id for a table: derived from the name, so every node agrees.
pub fn datatype_id(table: &str) -> Ulid {
    // FNV-1a, 128-bit; 80 bits of it form the ULID's random part.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in table.as_bytes() {
        h ^= u128::from(*b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    Ulid::from_parts(0, h)
}

pub(super) fn registry_table() -> TableInfo {
    TableInfo {
        datatype_id: Ulid::nil(),
        table_name: REGISTRY_TABLE.to_owned(),
        primary_key: "datatype_id".to_owned(),
        columns: vec![
            "datatype_id".to_owned(),
            "table_name".to_owned(),
            "conflict_policy".to_owned(),
        ],
        types: vec![
            ColumnType::Char { len: 26 },
            ColumnType::Text {
                max_chars: Some(64),
            },
            ColumnType::Text {
                max_chars: Some(20),
            },
        ],
        declared: vec![
            "CHAR(26)".into(),
            "VARCHAR(64)".into(),
            "VARCHAR(20)".into(),
        ],
        conflict_policy: ConflictPolicy::Lww,
        uniques: Vec::new(),
        foreign_keys: Vec::new(),
    }
}

pub(super) fn registry_values(table: &str, policy: ConflictPolicy) -> Values {
    let mut v = Values::new();
    v.insert(
        "datatype_id".into(),
        Value::String(datatype_id(table).to_string()),
    );
    v.insert("table_name".into(), Value::String(table.to_owned()));
    v.insert(
        "conflict_policy".into(),
        Value::String(policy.as_str().to_owned()),
    );
    v
}

pub(super) fn parse_registry_values(v: &Values) -> Option<(String, ConflictPolicy)> {
    let name = v.get("table_name")?.as_str()?.to_owned();
    let policy = v.get("conflict_policy")?.as_str()?.parse().ok()?;
    Some((name, policy))
}

/// Whether a declared column type can hold a ULID as text.
fn is_ulid_text_type(ty: &str) -> bool {
    let t = ty.trim().to_ascii_lowercase();
    t == "text"
        || t == "char(26)"
        || t == "character(26)"
        || t == "varchar(26)"
        || t == "character varying(26)"
}
