// Preload for the cache-tests server: `node --import /path/to/bind-loopback.mjs server.mjs`.
//
// The suite's server calls `server.listen(port)` with no host, which makes node
// listen on every interface. The conformance gate must only ever use loopback,
// so every TCP listen without a host (or with a wildcard host such as 0.0.0.0
// or ::) is rewritten to bind 127.0.0.1. Pipes, file descriptors and handles
// are left alone.
import net from 'node:net'

const LOOPBACK = '127.0.0.1'
const WILDCARD_HOSTS = new Set(['', '0.0.0.0', '::', '[::]', '::0'])

const originalListen = net.Server.prototype.listen

// Same rule node uses to tell a port from a pipe path: numbers, and strings
// that parse as numbers, are ports.
function isPortLike (value) {
  if (value === undefined || value === null) return true
  if (typeof value === 'number') return true
  return typeof value === 'string' && value.trim() !== '' && !Number.isNaN(Number(value))
}

function needsLoopback (host) {
  return host === undefined || host === null || WILDCARD_HOSTS.has(String(host))
}

net.Server.prototype.listen = function listenOnLoopback (...args) {
  const first = args[0]
  if (args.length === 0 || typeof first === 'function') {
    // listen() / listen(cb): an ephemeral port.
    return originalListen.call(this, 0, LOOPBACK, ...args)
  }
  if (typeof first === 'object' && first !== null) {
    const isSocketOptions = !('path' in first) && !('fd' in first) && !('handle' in first) &&
      !('_handle' in first) && !(first instanceof net.Server) && !(first instanceof net.Socket)
    if (isSocketOptions && needsLoopback(first.host)) {
      return originalListen.call(this, { ...first, host: LOOPBACK }, ...args.slice(1))
    }
    return originalListen.apply(this, args)
  }
  if (isPortLike(first)) {
    const port = first ?? 0
    if (typeof args[1] === 'string') {
      // listen(port, host, ...)
      const host = needsLoopback(args[1]) ? LOOPBACK : args[1]
      return originalListen.call(this, port, host, ...args.slice(2))
    }
    // listen(port[, backlog][, cb])
    return originalListen.call(this, port, LOOPBACK, ...args.slice(1))
  }
  return originalListen.apply(this, args)
}
