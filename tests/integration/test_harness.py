"""The harness itself: throw-away servers are real and isolated per test."""

import psycopg2


def test_redis_is_real_and_flushed(redis_server, redis_url):
    client = redis_server.client()
    assert client.dbsize() == 0
    client.set("gpufleet:probe", "1")
    assert client.get("gpufleet:probe") == "1"


def test_postgres_gives_each_test_its_own_database(database_url, postgres_server):
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE probe (x int)")
        cur.execute("INSERT INTO probe VALUES (42)")
        cur.execute("SELECT x FROM probe")
        assert cur.fetchone() == (42,)
    conn.close()
