"""The mesh registry: where model-worker instances announce themselves and the gateway finds them.

Run: ``AXL_REGISTRY_SECRET=... python -m services.mesh_registry`` (binds :8900; ``AXL_REDIS_URL``,
``AXL_INSTANCE_TTL_SECONDS`` (15), ``AXL_REGISTRY_PROTECT_READS`` (true), ``AXL_REGISTRY_KEY_PREFIX``).

API (JSON; errors in the OpenAI shape):
  POST   /v1/instances                    register {instance_id, specialist, model_id, url, context_length,
                                          capabilities, checkpoint_version, max_concurrency, load?}
  PUT    /v1/instances/{id}/heartbeat     the same body with live load {running, waiting}; re-creates a lost entry
  DELETE /v1/instances/{id}               forget now (204; 404 if unknown)
  GET    /v1/instances?model=&specialist= healthy instances, least busy first
  GET    /v1/models                       served models: specialist, smallest context, shared capabilities, count
  GET    /healthz, /readyz (503 without Redis), /metrics

Auth: every write needs ``Authorization: Bearer <AXL_REGISTRY_SECRET>`` (the registry will not start without a
secret of 8+ characters), so a process without it can neither announce nor take over an instance id or model
name. Reads need it too (instance URLs and loads say where the workers are and how busy;
``RegistryClient`` always sends it); ``AXL_REGISTRY_PROTECT_READS=false`` opens them for a closed network.
``/healthz``, ``/readyz`` and ``/metrics`` stay open (container health checks, Prometheus).

State lives only in Redis (see ``store.py``), so a registry restart loses nothing, and since every heartbeat
re-asserts the whole registration, even losing Redis heals within one heartbeat interval.
"""
