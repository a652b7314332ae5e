def test_health_and_readiness(client, postgres_engine):
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "migrations": "ok"}


def test_openapi_documents_every_route_with_examples(client):
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation.get("summary"), f"{method} {path} has no summary"
            body = operation.get("requestBody")
            if body:
                ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
                assert spec["components"]["schemas"][ref].get("examples"), f"{ref} has no example"
    assert "X-API-Key" in str(spec["components"]["securitySchemes"])
