/* md5.h: MD5 (RFC 1321) for mailfilter._core, written for this project.
 *
 * Only what HMAC-MD5 / CRAM-MD5 (RFC 2104, RFC 2195) needs:
 *   mf_md5_init      the RFC 1321 §3.3 initial chaining state A, B, C, D
 *   mf_md5_compress  one 64-byte block into a chaining state (RFC 1321 §3.4)
 *   mf_md5_compress_words  the same on 16 message words already loaded
 *   mf_md5_finish    the rest of a message plus padding and length (§3.1, §3.2),
 *                    continuing from a state that has already absorbed
 *                    `prefix_len` bytes (a multiple of 64); writes the digest (§3.5)
 *   mf_md5_finish_outer16  HMAC's outer finish over a 16-byte inner digest
 *
 * The state is four uint32 words; the digest is those words little-endian.
 * Byte order is handled explicitly, so this is correct on any host.
 */
#ifndef MAILFILTER_MD5_H
#define MAILFILTER_MD5_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* RFC 1321 §3.4 auxiliary functions, in the usual select/majority forms:
 * F(X,Y,Z) = XY v not(X)Z    ==  Z ^ (X & (Y ^ Z))
 * G(X,Y,Z) = XZ v Y not(Z)   ==  Y ^ (Z & (X ^ Y))
 * H(X,Y,Z) = X xor Y xor Z
 * I(X,Y,Z) = Y xor (X v not(Z)) */
#define MF_MD5_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define MF_MD5_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define MF_MD5_H(x, y, z) ((x) ^ (y) ^ (z))
#define MF_MD5_I(x, y, z) ((y) ^ ((x) | ~(z)))

/* Round 2 step: G's two terms select disjoint bits, so their OR is their
 * sum; adding the b-independent term first shortens the dependency chain
 * through b (same result as MF_MD5_STEP with MF_MD5_G). */
#define MF_MD5_STEP2(a, b, c, d, xk, s, t) do {            \
        (a) += (xk) + (uint32_t)(t) + ((c) & ~(d));         \
        (a) += (b) & (d);                                   \
        (a) = MF_MD5_ROTL((a), (s));                        \
        (a) += (b);                                         \
    } while (0)

#define MF_MD5_ROTL(v, s) (((v) << (s)) | ((v) >> (32 - (s))))

/* a = b + ((a + f(b,c,d) + X[k] + T[i]) <<< s) */
#define MF_MD5_STEP(f, a, b, c, d, xk, s, t) do {          \
        (a) += f((b), (c), (d)) + (xk) + (uint32_t)(t);     \
        (a) = MF_MD5_ROTL((a), (s));                        \
        (a) += (b);                                         \
    } while (0)

static inline uint32_t mf_md5_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) |
           ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void mf_md5_put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* RFC 1321 §3.3: word A = 01 23 45 67 (low-order byte first), etc. */
static inline void mf_md5_init(uint32_t st[4])
{
    st[0] = 0x67452301u;
    st[1] = 0xefcdab89u;
    st[2] = 0x98badcfeu;
    st[3] = 0x10325476u;
}

/* RFC 1321 §3.4: process one block given as 16 words X[0..15].
 * T[i] = floor(2^32 * |sin(i)|), i = 1..64. */
static inline void mf_md5_compress_words(uint32_t st[4], const uint32_t x[16])
{
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];

    MF_MD5_STEP(MF_MD5_F, a, b, c, d, x[ 0],  7, 0xd76aa478u);
    MF_MD5_STEP(MF_MD5_F, d, a, b, c, x[ 1], 12, 0xe8c7b756u);
    MF_MD5_STEP(MF_MD5_F, c, d, a, b, x[ 2], 17, 0x242070dbu);
    MF_MD5_STEP(MF_MD5_F, b, c, d, a, x[ 3], 22, 0xc1bdceeeu);
    MF_MD5_STEP(MF_MD5_F, a, b, c, d, x[ 4],  7, 0xf57c0fafu);
    MF_MD5_STEP(MF_MD5_F, d, a, b, c, x[ 5], 12, 0x4787c62au);
    MF_MD5_STEP(MF_MD5_F, c, d, a, b, x[ 6], 17, 0xa8304613u);
    MF_MD5_STEP(MF_MD5_F, b, c, d, a, x[ 7], 22, 0xfd469501u);
    MF_MD5_STEP(MF_MD5_F, a, b, c, d, x[ 8],  7, 0x698098d8u);
    MF_MD5_STEP(MF_MD5_F, d, a, b, c, x[ 9], 12, 0x8b44f7afu);
    MF_MD5_STEP(MF_MD5_F, c, d, a, b, x[10], 17, 0xffff5bb1u);
    MF_MD5_STEP(MF_MD5_F, b, c, d, a, x[11], 22, 0x895cd7beu);
    MF_MD5_STEP(MF_MD5_F, a, b, c, d, x[12],  7, 0x6b901122u);
    MF_MD5_STEP(MF_MD5_F, d, a, b, c, x[13], 12, 0xfd987193u);
    MF_MD5_STEP(MF_MD5_F, c, d, a, b, x[14], 17, 0xa679438eu);
    MF_MD5_STEP(MF_MD5_F, b, c, d, a, x[15], 22, 0x49b40821u);

    MF_MD5_STEP2(a, b, c, d, x[ 1],  5, 0xf61e2562u);
    MF_MD5_STEP2(d, a, b, c, x[ 6],  9, 0xc040b340u);
    MF_MD5_STEP2(c, d, a, b, x[11], 14, 0x265e5a51u);
    MF_MD5_STEP2(b, c, d, a, x[ 0], 20, 0xe9b6c7aau);
    MF_MD5_STEP2(a, b, c, d, x[ 5],  5, 0xd62f105du);
    MF_MD5_STEP2(d, a, b, c, x[10],  9, 0x02441453u);
    MF_MD5_STEP2(c, d, a, b, x[15], 14, 0xd8a1e681u);
    MF_MD5_STEP2(b, c, d, a, x[ 4], 20, 0xe7d3fbc8u);
    MF_MD5_STEP2(a, b, c, d, x[ 9],  5, 0x21e1cde6u);
    MF_MD5_STEP2(d, a, b, c, x[14],  9, 0xc33707d6u);
    MF_MD5_STEP2(c, d, a, b, x[ 3], 14, 0xf4d50d87u);
    MF_MD5_STEP2(b, c, d, a, x[ 8], 20, 0x455a14edu);
    MF_MD5_STEP2(a, b, c, d, x[13],  5, 0xa9e3e905u);
    MF_MD5_STEP2(d, a, b, c, x[ 2],  9, 0xfcefa3f8u);
    MF_MD5_STEP2(c, d, a, b, x[ 7], 14, 0x676f02d9u);
    MF_MD5_STEP2(b, c, d, a, x[12], 20, 0x8d2a4c8au);

    MF_MD5_STEP(MF_MD5_H, a, b, c, d, x[ 5],  4, 0xfffa3942u);
    MF_MD5_STEP(MF_MD5_H, d, a, b, c, x[ 8], 11, 0x8771f681u);
    MF_MD5_STEP(MF_MD5_H, c, d, a, b, x[11], 16, 0x6d9d6122u);
    MF_MD5_STEP(MF_MD5_H, b, c, d, a, x[14], 23, 0xfde5380cu);
    MF_MD5_STEP(MF_MD5_H, a, b, c, d, x[ 1],  4, 0xa4beea44u);
    MF_MD5_STEP(MF_MD5_H, d, a, b, c, x[ 4], 11, 0x4bdecfa9u);
    MF_MD5_STEP(MF_MD5_H, c, d, a, b, x[ 7], 16, 0xf6bb4b60u);
    MF_MD5_STEP(MF_MD5_H, b, c, d, a, x[10], 23, 0xbebfbc70u);
    MF_MD5_STEP(MF_MD5_H, a, b, c, d, x[13],  4, 0x289b7ec6u);
    MF_MD5_STEP(MF_MD5_H, d, a, b, c, x[ 0], 11, 0xeaa127fau);
    MF_MD5_STEP(MF_MD5_H, c, d, a, b, x[ 3], 16, 0xd4ef3085u);
    MF_MD5_STEP(MF_MD5_H, b, c, d, a, x[ 6], 23, 0x04881d05u);
    MF_MD5_STEP(MF_MD5_H, a, b, c, d, x[ 9],  4, 0xd9d4d039u);
    MF_MD5_STEP(MF_MD5_H, d, a, b, c, x[12], 11, 0xe6db99e5u);
    MF_MD5_STEP(MF_MD5_H, c, d, a, b, x[15], 16, 0x1fa27cf8u);
    MF_MD5_STEP(MF_MD5_H, b, c, d, a, x[ 2], 23, 0xc4ac5665u);

    MF_MD5_STEP(MF_MD5_I, a, b, c, d, x[ 0],  6, 0xf4292244u);
    MF_MD5_STEP(MF_MD5_I, d, a, b, c, x[ 7], 10, 0x432aff97u);
    MF_MD5_STEP(MF_MD5_I, c, d, a, b, x[14], 15, 0xab9423a7u);
    MF_MD5_STEP(MF_MD5_I, b, c, d, a, x[ 5], 21, 0xfc93a039u);
    MF_MD5_STEP(MF_MD5_I, a, b, c, d, x[12],  6, 0x655b59c3u);
    MF_MD5_STEP(MF_MD5_I, d, a, b, c, x[ 3], 10, 0x8f0ccc92u);
    MF_MD5_STEP(MF_MD5_I, c, d, a, b, x[10], 15, 0xffeff47du);
    MF_MD5_STEP(MF_MD5_I, b, c, d, a, x[ 1], 21, 0x85845dd1u);
    MF_MD5_STEP(MF_MD5_I, a, b, c, d, x[ 8],  6, 0x6fa87e4fu);
    MF_MD5_STEP(MF_MD5_I, d, a, b, c, x[15], 10, 0xfe2ce6e0u);
    MF_MD5_STEP(MF_MD5_I, c, d, a, b, x[ 6], 15, 0xa3014314u);
    MF_MD5_STEP(MF_MD5_I, b, c, d, a, x[13], 21, 0x4e0811a1u);
    MF_MD5_STEP(MF_MD5_I, a, b, c, d, x[ 4],  6, 0xf7537e82u);
    MF_MD5_STEP(MF_MD5_I, d, a, b, c, x[11], 10, 0xbd3af235u);
    MF_MD5_STEP(MF_MD5_I, c, d, a, b, x[ 2], 15, 0x2ad7d2bbu);
    MF_MD5_STEP(MF_MD5_I, b, c, d, a, x[ 9], 21, 0xeb86d391u);

    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
}

/* One 64-byte block; words are read little-endian (RFC 1321 §2). */
static inline void mf_md5_compress(uint32_t st[4], const unsigned char *block)
{
    uint32_t x[16];
    int k;
    for (k = 0; k < 16; k++)
        x[k] = mf_md5_le32(block + 4 * k);
    mf_md5_compress_words(st, x);
}

/* HMAC outer finish (RFC 2104) when the outer state has absorbed exactly one
 * 64-byte block: the remaining message is the 16-byte inner digest, i.e. the
 * inner state words `inner` as they are, so the final block is known word by
 * word: digest, 0x80, zeros, bit length 8 * (64 + 16) = 640. */
static inline void mf_md5_finish_outer16(uint32_t st[4], const uint32_t inner[4])
{
    uint32_t x[16] = {0};
    x[0] = inner[0];
    x[1] = inner[1];
    x[2] = inner[2];
    x[3] = inner[3];
    x[4] = 0x80u;
    x[14] = 640u;
    mf_md5_compress_words(st, x);
}

/* Absorb the last `n` bytes of a message and finish it (RFC 1321 §3.1-3.2:
 * a 0x80 byte, zeros to 56 mod 64, then the bit length as a 64-bit
 * little-endian integer). `prefix_len` is the number of bytes the state in
 * `st` has already absorbed (0 for a fresh state, 64 after an HMAC ipad or
 * opad block); it must be a multiple of 64. `st` is updated in place and
 * the 16-byte digest (§3.5) is written to `out`. */
static inline void mf_md5_finish(uint32_t st[4], const unsigned char *p,
                                 size_t n, uint64_t prefix_len,
                                 unsigned char out[16])
{
    unsigned char tail[128];
    uint64_t bits = (prefix_len + (uint64_t)n) * 8u;
    size_t total, i;

    while (n >= 64) {
        mf_md5_compress(st, p);
        p += 64;
        n -= 64;
    }
    total = (n < 56) ? 64 : 128;
    if (n)
        memcpy(tail, p, n);
    tail[n] = 0x80;
    memset(tail + n + 1, 0, total - 8 - (n + 1));
    for (i = 0; i < 8; i++)
        tail[total - 8 + i] = (unsigned char)(bits >> (8 * i));
    mf_md5_compress(st, tail);
    if (total == 128)
        mf_md5_compress(st, tail + 64);
    for (i = 0; i < 4; i++)
        mf_md5_put_le32(out + 4 * i, st[i]);
}

#endif /* MAILFILTER_MD5_H */
