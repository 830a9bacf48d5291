// bench_sink: the bench's delivery plugin for the Haraka peer (bench/haraka.py copies
// it into <tmp>/plugins/ and writes its settings to <tmp>/config/bench_sink.json).
//
// - lookup_rdns: the client is loopback, named "localhost" without asking DNS (Haraka
//   core would otherwise call dns.reverse for every connection).
// - get_mx: every domain goes to the sink, no DNS: routes[domain] ("ip:port") when the
//   scenario has one, else the sink's address.
// - deferred: retry a temp-failed delivery after retry_s seconds (outbound.ini's
//   temp_fail_intervals refuses anything under 5 s).
// - send_email + delivered/deferred/bounce (only with a throttle): per-domain
//   concurrency and message rate for the throttled domains, the way
//   haraka-plugin-limit's [outbound] and [rate_outbound] do it (send_email answers
//   DELAY while the domain is at its limit), kept in this worker's memory instead of
//   Redis. Workers share nothing, so each gets its share of the limit: max_connections
//   split over the workers (at least 1 each), the rate divided by their number.
'use strict'

const cluster = require('node:cluster')
const os = require('node:os')

// Haraka calls next_cb (and so the delivered hook) before it sends QUIT and closes the
// socket (outbound/hmail.js): a freed slot waits this long, so a new connection to the
// domain does not overlap the old one's QUIT.
const QUIT_GRACE_MS = 250

exports.register = function () {
    this.cfg = this.config.get('bench_sink.json', 'json') || {}
    const sink = split_host_port(this.cfg.sink || '127.0.0.1:25')
    this.sink = sink
    this.routes = new Map()
    for (const [domain, hostport] of Object.entries(this.cfg.routes || {})) {
        this.routes.set(domain.toLowerCase(), split_host_port(hostport))
    }
    this.retry_s = Math.max(1, Math.ceil(Number(this.cfg.retry_s) || 1))

    const throttle = this.cfg.throttle || {}
    const nodes = cluster.isWorker ? os.cpus().length : 1
    const index = cluster.isWorker ? (cluster.worker.id - 1) % nodes : 0
    this.max_conn = 0
    if (throttle.max_connections) {
        const total = Number(throttle.max_connections)
        this.max_conn = Math.max(1, Math.floor(total / nodes) + (index < total % nodes ? 1 : 0))
    }
    // milliseconds between two deliveries of this worker to one domain
    this.interval_ms = throttle.rate_per_s ? (1000 * nodes) / Number(throttle.rate_per_s) : 0
    this.throttled = new Set((throttle.domains || []).map((d) => d.toLowerCase()))
    this.state = new Map() // domain -> { active, last_start }
    this.holding = new WeakSet() // hmails that hold a connection slot

    this.register_hook('lookup_rdns', 'bench_lookup_rdns')
    this.register_hook('get_mx', 'bench_get_mx')
    this.register_hook('deferred', 'bench_deferred')
    if (this.throttled.size && (this.max_conn || this.interval_ms)) {
        this.register_hook('send_email', 'bench_send_email')
        this.register_hook('delivered', 'bench_release')
        this.register_hook('bounce', 'bench_release')
    }
}

function split_host_port(hostport) {
    const i = hostport.lastIndexOf(':')
    return { exchange: hostport.slice(0, i), port: parseInt(hostport.slice(i + 1), 10) }
}

exports.bench_lookup_rdns = function (next) {
    next(OK, 'localhost')
}

exports.bench_get_mx = function (next, hmail, domain) {
    const to = this.routes.get(String(domain).toLowerCase()) || this.sink
    next(OK, { exchange: to.exchange, port: to.port, priority: 0 })
}

exports.bench_deferred = function (next, hmail) {
    this.release(hmail)
    next(DENYSOFT, this.retry_s)
}

exports.bench_send_email = function (next, hmail) {
    const domain = String(hmail.todo.domain).toLowerCase()
    if (!this.throttled.has(domain)) return next()
    let st = this.state.get(domain)
    if (!st) {
        st = { active: 0, last_start: 0 }
        this.state.set(domain, st)
    }
    if (this.max_conn && st.active >= this.max_conn) return next(DELAY, 1)
    const now = Date.now()
    if (this.interval_ms && st.last_start && now < st.last_start + this.interval_ms) {
        return next(DELAY, (st.last_start + this.interval_ms - now) / 1000)
    }
    st.active++
    st.last_start = now
    this.holding.add(hmail)
    next()
}

exports.bench_release = function (next, hmail) {
    this.release(hmail)
    next()
}

exports.release = function (hmail) {
    if (!this.holding.has(hmail)) return
    this.holding.delete(hmail)
    const st = this.state.get(String(hmail.todo.domain).toLowerCase())
    if (st) setTimeout(() => st.active--, QUIT_GRACE_MS)
}
