"""The routes table: one Route per path, so a 405 names every method the path has."""

from __future__ import annotations

from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from api.app import one_route_per_path, routes


def _paths(table, prefix=""):
    for route in table:
        if isinstance(route, Mount):
            yield from _paths(route.routes, prefix + route.path)
        else:
            yield prefix + route.path


def test_every_path_of_the_app_has_one_route():
    paths = list(_paths(routes()))
    assert len(paths) == len(set(paths)), sorted(p for p in paths if paths.count(p) > 1)


def test_joined_routes_dispatch_by_method_and_allow_names_them_all():
    async def get(request):
        return PlainTextResponse("got")

    async def put(request):
        return PlainTextResponse("put")

    table = one_route_per_path([Route("/x", put, methods=["PUT"]),
                                Route("/x", get, methods=["GET"]),
                                Mount("/m", routes=[Route("/y", get, methods=["GET"]),
                                                    Route("/y", put, methods=["PUT"])])])
    client = TestClient(Starlette(routes=table))
    assert client.get("/x").text == "got"
    assert client.put("/x").text == "put"
    assert client.put("/m/y").text == "put"
    refused = client.delete("/x")
    assert refused.status_code == 405
    assert set(refused.headers["allow"].replace(" ", "").split(",")) >= {"GET", "PUT"}
