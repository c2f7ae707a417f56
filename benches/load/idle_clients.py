"""Idle keep-alive clients for benches/load/compare.sh (IDLE=1).

Opens COUNT connections to 127.0.0.1:PORT, each sends one HTTP/1.1 request
and reads its whole response, then the connections stay open and silent.
Prints "ready" once every client has its response, then waits for a line on
standard input and closes them all.
"""
import asyncio
import sys


async def one_client(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    await reader.readexactly(length)
    return writer


async def main(port, count):
    writers = []
    # In batches: a proxy's accept backlog is finite.
    for start in range(0, count, 200):
        batch = min(200, count - start)
        writers += await asyncio.gather(*(one_client(port) for _ in range(batch)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
