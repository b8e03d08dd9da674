/* Decode rows of a JPEG with the libjpeg API (libjpeg-turbo), for runtime/jpeg_bands.py.
 *
 * Built at install as an optional extension (setup.py) and called through ctypes, which releases
 * the GIL: two threads decode the top and the bottom rows of one image at once. The bottom's thread
 * entropy-decodes the rows above its own (jpeg_skip_scanlines: no IDCT, upsampling or colour
 * conversion for them); the bottom rows go to whichever thread gets to them first
 * (jb_decode_top, jb_decode_bottom). Each call writes only rows it decoded into `out`.
 *
 * libjpeg reports errors by calling error_exit, whose default ends the process: here error_exit
 * and every warning longjmp back with the message, so bytes from the network can only produce a
 * return code. Warnings count as failures (the caller then takes its strict decoder's path, which
 * refuses them too).
 *
 * Return codes (JB_* below): 0 decoded; 1 libjpeg error; 2 libjpeg warning; 3 the image is not
 * what the caller was told (size) or decodes to something else than 3 channels; 4 not split here
 * (progressive or multi-scan, or a sampling this file does not take: the caller decodes it whole);
 * 5 (jb_decode_bottom) the other thread took the bottom rows: nothing written.
 */

#include <setjmp.h>
#include <stddef.h>
#include <stdio.h> /* jpeglib.h uses FILE and size_t */
#include <string.h>

#include <jpeglib.h>

#define JB_OK 0
#define JB_ERROR 1
#define JB_WARNING 2
#define JB_MISMATCH 3
#define JB_NOT_SPLIT 4
#define JB_NOT_CLAIMED 5

#define ROWS_PER_CALL 32

struct jb_error {
  struct jpeg_error_mgr pub; /* first: libjpeg sees a jpeg_error_mgr */
  jmp_buf jump;
  char *msg;
  int msg_len;
};

static void jb_fail(j_common_ptr cinfo, int code) {
  struct jb_error *err = (struct jb_error *)cinfo->err;
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  if (err->msg != NULL && err->msg_len > 0) {
    strncpy(err->msg, text, (size_t)err->msg_len - 1);
    err->msg[err->msg_len - 1] = '\0';
  }
  longjmp(err->jump, code);
}

static void jb_error_exit(j_common_ptr cinfo) { jb_fail(cinfo, JB_ERROR); }

/* level < 0: a warning (corrupt data, premature end...); >= 0: trace messages, ignored */
static void jb_emit_message(j_common_ptr cinfo, int level) {
  if (level < 0) jb_fail(cinfo, JB_WARNING);
}

/* Luma sampling 1x1, 2x1 or 2x2 with 1x1 chroma (4:4:4, 4:2:2, 4:2:0), or one grey component:
 * the samplings the band split is tested on (tests/runtime/test_jpeg_bands.py). */
static int jb_sampling_ok(const struct jpeg_decompress_struct *cinfo) {
  int h, v, c;
  if (cinfo->num_components == 1) return 1;
  if (cinfo->num_components != 3) return 0;
  h = cinfo->comp_info[0].h_samp_factor;
  v = cinfo->comp_info[0].v_samp_factor;
  if (!((h == 1 && v == 1) || (h == 2 && v == 1) || (h == 2 && v == 2))) return 0;
  for (c = 1; c < 3; c++)
    if (cinfo->comp_info[c].h_samp_factor != 1 || cinfo->comp_info[c].v_samp_factor != 1) return 0;
  return 1;
}

/* After jpeg_read_header: the checks, the output settings, jpeg_start_decompress. JB_OK, or the code
 * to return. A part of the image (partial) needs a single-scan image of a sampling the split takes. */
static int jb_start(j_decompress_ptr cinfo, int width, int height, int partial) {
  if ((long)cinfo->image_width != width || (long)cinfo->image_height != height) return JB_MISMATCH;
  if (partial && (jpeg_has_multiple_scans(cinfo) || !jb_sampling_ok(cinfo))) return JB_NOT_SPLIT;
  /* what Pillow's and simplejpeg's decoders use: accurate integer IDCT, fancy upsampling */
  cinfo->out_color_space = JCS_RGB;
  cinfo->dct_method = JDCT_ISLOW;
  cinfo->do_fancy_upsampling = TRUE;
  jpeg_start_decompress(cinfo);
  if (cinfo->output_components != 3 || (long)cinfo->output_width != width ||
      (long)cinfo->output_height != height)
    return JB_MISMATCH;
  return JB_OK;
}

/* Decodes on from output_scanline to row1 into the same rows of out. */
static int jb_read(j_decompress_ptr cinfo, unsigned char *out, int width, int row1) {
  JSAMPROW rows[ROWS_PER_CALL];
  while ((int)cinfo->output_scanline < row1) {
    int n = row1 - (int)cinfo->output_scanline, i;
    if (n > ROWS_PER_CALL) n = ROWS_PER_CALL;
    for (i = 0; i < n; i++)
      rows[i] = out + ((size_t)cinfo->output_scanline + (size_t)i) * (size_t)width * 3;
    if (jpeg_read_scanlines(cinfo, rows, (JDIMENSION)n) == 0) return JB_MISMATCH; /* suspended: not from memory */
  }
  return JB_OK;
}

/* Whether this thread (me: 1 or 2) takes the claimed rows: they were unclaimed, now they are its. */
static int jb_claim(int *claim, int me) {
  int unclaimed = 0;
  return __atomic_compare_exchange_n(claim, &unclaimed, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* The one decoding routine behind the three entry points below: rows [row0, row1) of the
 * (height, width, 3) uint8 RGB image in `data` into the same rows of `out` (height * width * 3
 * bytes, C order), 0 <= row0 < row1 <= height. With a claim (*claim: 0 unclaimed, 1 the top's
 * thread, 2 the bottom's): as `me` == 2, the rows from row0 on are decoded only if this call claims
 * them when it gets there; as `me` == 1, a call that finds the rows after row1 unclaimed claims
 * them and decodes on to the end. */
static int jb_decode(const unsigned char *data, unsigned long size, unsigned char *out, int width,
                     int height, int row0, int row1, int *claim, int me, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct jb_error err;
  int code;

  if (msg != NULL && msg_len > 0) msg[0] = '\0';
  if (width <= 0 || height <= 0 || row0 < 0 || row1 > height || row0 >= row1) return JB_MISMATCH;
  if (claim != NULL && me == 2 && __atomic_load_n(claim, __ATOMIC_ACQUIRE) != 0) return JB_NOT_CLAIMED;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = jb_error_exit;
  err.pub.emit_message = jb_emit_message;
  err.msg = msg;
  err.msg_len = msg_len;
  code = setjmp(err.jump);
  if (code != 0) {
    jpeg_destroy_decompress(&cinfo);
    return code;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  code = jb_start(&cinfo, width, height, claim != NULL || row0 > 0 || row1 < height);
  if (code == JB_OK && row0 > 0 && (int)jpeg_skip_scanlines(&cinfo, (JDIMENSION)row0) != row0) code = JB_MISMATCH;
  if (code == JB_OK && claim != NULL && me == 2 && !jb_claim(claim, 2)) code = JB_NOT_CLAIMED;
  if (code == JB_OK) code = jb_read(&cinfo, out, width, row1);
  if (code == JB_OK && claim != NULL && me == 1 && jb_claim(claim, 1)) {
    row1 = height;
    code = jb_read(&cinfo, out, width, row1);
  }
  /* the last rows read on to the end of the image, where a warning about the data can still come */
  if (code == JB_OK && row1 == height) jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return code;
}

/* Rows [row0, row1) of the image into the same rows of `out`. */
int jb_decode_rows(const unsigned char *data, unsigned long size, unsigned char *out, int width,
                   int height, int row0, int row1, char *msg, int msg_len) {
  return jb_decode(data, size, out, width, height, row0, row1, NULL, 0, msg, msg_len);
}

/* The two halves of one image decoded by two threads, the bottom rows going to whichever thread
 * claims them first. The top's thread decodes rows [0, split) and then, if the bottom's thread has
 * not yet claimed the rest (it was not scheduled in time: the cores are busy), decodes on to the
 * end itself, from where it is, so a busy machine costs no more than one thread would. The
 * bottom's thread skips to `split` (entropy decoding only) and claims the rest when it gets there
 * first; else it stops without writing a row. The caller may let go of `out` once both returned,
 * or once *claim is 1. */
int jb_decode_top(const unsigned char *data, unsigned long size, unsigned char *out, int width,
                  int height, int split, int *claim, char *msg, int msg_len) {
  if (split >= height) return JB_MISMATCH;
  return jb_decode(data, size, out, width, height, 0, split, claim, 1, msg, msg_len);
}

int jb_decode_bottom(const unsigned char *data, unsigned long size, unsigned char *out, int width,
                     int height, int split, int *claim, char *msg, int msg_len) {
  if (split <= 0) return JB_MISMATCH;
  return jb_decode(data, size, out, width, height, split, height, claim, 2, msg, msg_len);
}
